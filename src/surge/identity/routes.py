"""Identity's HTTP surface: ``/api/v1/auth/*``, ``/api/v1/me*``, ``/api/v1/privileges/batch``
and the admin route ``/api/admin/users/{id}/plan`` (mounted by ``surge.admin.surface``)."""

from __future__ import annotations

import uuid

import orjson
import structlog
from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from starlette.types import Scope

from surge.identity.deps import (
    AdminMfa,
    CurrentUser,
    bind_principal,
    current_user,
    require_admin_mfa,
)
from surge.identity.devices import DEVICE_COOKIE, set_device_cookie
from surge.identity.errors import EmailTaken
from surge.identity.mfa import mfa as mfa_service
from surge.identity.plans import Privileges
from surge.identity.principal import PRINCIPAL_STATE, PRIVILEGES_STATE, Principal, TokenPair
from surge.identity.recovery import password_reset as password_reset_service
from surge.identity.runtime import identity_state
from surge.identity.schemas import (
    AccessTokenRead,
    BatchRead,
    BatchRequest,
    LoginRequest,
    LogoutRequest,
    MfaSetupRead,
    MfaVerifyRequest,
    PasswordForgotAccepted,
    PasswordForgotRequest,
    PasswordResetRequest,
    PlanChange,
    PrivilegesRead,
    RefreshRequest,
    RegistrationAccepted,
    SessionRead,
    TokenRead,
    UserCreate,
    UserRead,
)
from surge.identity.service import identity as identity_service
from surge.kit.runtime import Runtime
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep
from surge.kit.web.pagination import Cursor, Limit, Page
from surge.kit.web.responses import JSONBytes
from surge.kit.web.routing import shortcut_route


def _tokens(pair: TokenPair) -> TokenRead:
    return TokenRead(
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        expires_in=pair.expires_in,
        session_id=pair.session_id,
        device_token=pair.device_token,
    )


def _client_ip(request: Request, runtime: Runtime) -> str:
    """The client address behind trusted proxies (``TRUSTED_PROXIES``): the per-IP login
    budget must count the caller, not the load balancer."""
    return identity_service.client_ip(runtime, request.scope)


log = structlog.get_logger()

router = APIRouter(prefix="/api/v1", tags=["identity"])


async def my_privileges(request: Request) -> Response:
    """The caller's plan, features and rate tier (seed 003). The hot path of the API: no
    FastAPI dependencies (their resolution cost as much as the rest of the request), the
    principal and privileges the rate-limit hook already resolved for this request, and the
    body bytes memoised on the ``Privileges`` (``PrivilegesRead`` documents them) —
    bench/privileges.py."""
    state = request.scope.get("state") or {}
    principal: Principal | None = state.get(PRINCIPAL_STATE)
    p: Privileges | None = state.get(PRIVILEGES_STATE)
    if principal is None or p is None or p.user_id != principal.user_id:
        principal = await current_user(request)
        p = await identity_service.privileges_of(request.app.state.runtime, principal.user_id)
    else:
        bind_principal(state, principal)  # as current_user leaves it
    return JSONBytes(p.json)


@router.post("/auth/register", status_code=status.HTTP_202_ACCEPTED)
async def register(
    body: UserCreate, session: SessionDep, runtime: RuntimeDep
) -> RegistrationAccepted:
    """The same 202 whatever the address: a taken (or look-alike) address is not revealed.
    The owner of a taken address gets a "you already have an account" e-mail instead."""
    try:
        await identity_service.register(session, runtime, email=body.email, password=body.password)
    except EmailTaken:
        # As slow as a real registration (one password hash): no timing oracle either.
        await identity_state(runtime).hasher.hash(body.password)
        await identity_service.notify_existing_account(session, body.email)
    return RegistrationAccepted()


LOGIN_PATH = "/api/v1/auth/login"


@router.post("/auth/login")
async def login(
    body: LoginRequest,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> TokenRead:
    """Sign in. A client that sends the ``device_token`` of its last sign-in to this
    account (body field, or the ``surge_device`` cookie a browser keeps) is judged by its
    own failure budget: failures elsewhere cannot lock it out (ADR 0044)."""
    pair = await identity_service.login(
        session,
        runtime,
        email=body.email,
        password=body.password,
        otp=body.otp,
        ip=_client_ip(request, runtime),
        user_agent=request.headers.get("user-agent"),
        device_token=body.device_token or request.cookies.get(DEVICE_COOKIE),
    )
    if pair.device_token:
        set_device_cookie(response, pair.device_token, runtime.settings, path=LOGIN_PATH)
    return _tokens(pair)


@router.post("/auth/refresh")
async def refresh(body: RefreshRequest, session: SessionDep, runtime: RuntimeDep) -> TokenRead:
    return _tokens(await identity_service.refresh(session, runtime, body.refresh_token))


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(
    principal: CurrentUser,
    session: SessionDep,
    runtime: RuntimeDep,
    body: LogoutRequest | None = None,
) -> Response:
    await identity_service.logout(
        session, runtime, principal, everywhere=bool(body and body.everywhere)
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/auth/sessions")
async def list_sessions(
    principal: CurrentUser,
    session: ReadSessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[SessionRead]:
    rows, next_cursor = await identity_service.sessions_page(
        session, principal, limit=limit, cursor=cursor
    )
    items = [
        SessionRead.model_validate(row).model_copy(
            update={"current": row.id == principal.session_id}
        )
        for row in rows
    ]
    return Page[SessionRead](items=items, next_cursor=next_cursor)


@router.delete("/auth/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_session(
    session_id: uuid.UUID, principal: CurrentUser, session: SessionDep, runtime: RuntimeDep
) -> Response:
    await identity_service.revoke_session(session, runtime, principal, session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/auth/mfa/setup")
async def mfa_setup(
    principal: CurrentUser, session: SessionDep, runtime: RuntimeDep
) -> MfaSetupRead:
    enrollment = await mfa_service.setup(session, runtime, principal)
    return MfaSetupRead(
        secret=enrollment.secret,
        provisioning_uri=enrollment.provisioning_uri,
        backup_codes=enrollment.backup_codes,
    )


@router.post("/auth/mfa/verify")
async def mfa_verify(
    body: MfaVerifyRequest,
    principal: CurrentUser,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
) -> AccessTokenRead:
    token = await mfa_service.verify(
        session, runtime, principal, body.code, ip=_client_ip(request, runtime)
    )
    return AccessTokenRead(access_token=token, expires_in=identity_service.access_ttl(runtime))


@router.get("/me", response_model=UserRead)
async def me(principal: CurrentUser, runtime: RuntimeDep) -> Response:
    """From the user cache tiers, as bytes: warm, no pooled connection (ADR 0016)."""
    return JSONBytes(await identity_service.me(runtime, principal.user_id))


@router.post(
    "/privileges/batch", dependencies=[Depends(require_admin_mfa)], response_model=BatchRead
)
async def privileges_batch(body: BatchRequest, runtime: RuntimeDep) -> Response:
    """Up to 100 users in one call (seed 003): answered from memory when warm, else one
    Redis MGET and one SQL query for all the misses. JSON bytes written directly: building
    100 response models cost more than the checks themselves (bench/privileges.py)."""
    found = await identity_service.privileges_many(runtime, body.user_ids)
    feature = body.feature
    results = []
    for user_id in body.user_ids:
        p = found[user_id]
        results.append(
            {
                "user_id": str(user_id),
                "found": p.found,
                "plan": p.plan,
                "allowed": (feature in p.features) if feature is not None else None,
                "features": sorted(p.features),
            }
        )
    return Response(orjson.dumps({"results": results}), media_type="application/json")


admin_router = APIRouter(prefix="/api/admin", tags=["admin"])


def install_routes(app: FastAPI) -> None:
    """Add identity's public routes to ``app`` (its admin router is mounted by
    ``surge.admin.surface``). ``GET /api/v1/me/privileges`` goes directly on the
    app's router, before everything else identity adds: it is the hottest route of the API,
    FastAPI keeps included routers nested (a few µs per request) and matches routes in order
    (cost grows with the position) — bench/privileges.py."""
    app.router.add_api_route(
        "/api/v1/me/privileges",
        my_privileges,
        methods=["GET"],
        response_model=PrivilegesRead,
        tags=["identity"],
        summary="The caller's plan, features and rate tier",
    )
    shortcut_route(app, my_privileges, privileges_from_hook)
    app.include_router(router)


def privileges_from_hook(scope: Scope) -> bytes | None:
    """``GET /api/v1/me/privileges`` when the rate-limit hook already authenticated the
    caller and found their privileges in memory (the common case): the memoised body, bound
    to the principal as ``current_user`` leaves it (``shortcut_route``, ADR 0048). Anything
    else (no hook answer: limiter off, hook failed, token not in memory) returns ``None`` and
    the route as FastAPI built it (``my_privileges``) answers, so errors and 401s are
    unchanged."""
    state = scope.get("state")
    if state is None:
        return None
    principal: Principal | None = state.get(PRINCIPAL_STATE)
    p: Privileges | None = state.get(PRIVILEGES_STATE)
    if principal is None or p is None or p.user_id != principal.user_id:
        return None
    bind_principal(state, principal)
    return p.json


@admin_router.put("/users/{user_id}/plan", status_code=status.HTTP_204_NO_CONTENT)
async def change_plan(
    user_id: uuid.UUID,
    body: PlanChange,
    *,
    principal: AdminMfa,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
) -> Response:
    await identity_service.change_plan(
        session,
        runtime,
        principal.user_id,
        user_id=user_id,
        plan=body.plan,
        expires_at=body.expires_at,
        request_id=getattr(request.state, "request_id", None),
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---- password reset (issue 15, surge.identity.recovery) -----------------------------------
@router.post("/auth/password/forgot", status_code=status.HTTP_202_ACCEPTED)
async def forgot_password(
    body: PasswordForgotRequest, request: Request, session: SessionDep, runtime: RuntimeDep
) -> PasswordForgotAccepted:
    """Always 202 with the same body, and the same work, whether or not the address has an
    account (the account is looked up by a job); 429 past the per-IP budget."""
    await password_reset_service.forgot(
        session, runtime, email=body.email, ip=_client_ip(request, runtime)
    )
    return PasswordForgotAccepted()


@router.post("/auth/password/reset", status_code=status.HTTP_204_NO_CONTENT)
async def reset_password(
    body: PasswordResetRequest, request: Request, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Spend a reset token and set a new password (400 if the token is unknown, used,
    expired or superseded); every session of the account is signed out."""
    await password_reset_service.reset(
        session, runtime, token=body.token, password=body.password,
        ip=_client_ip(request, runtime), request_id=getattr(request.state, "request_id", None),
    )  # fmt: skip
    return Response(status_code=status.HTTP_204_NO_CONTENT)
