"""Operations HTTP API: the reseller's operations and prices, the admin's provider accounts,
proxies and review queue, and the reseller panel page (``/panel``)."""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from surge.audit.schemas import APPROVAL_PENDING_RESPONSE
from surge.audit.service import audit as audit_service
from surge.identity.deps import AdminMfa, require_role
from surge.identity.service import Principal
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep, request_id
from surge.kit.web.idempotency import REQUIRED_HEADER_OPENAPI, idempotency_keys
from surge.kit.web.pagination import Cursor, Limit
from surge.operations.schemas import (
    AccountCreate,
    AccountRead,
    AdminOperationPage,
    AdminOperationRead,
    AttemptRead,
    OperationCreate,
    OperationDetail,
    OperationPage,
    OperationRead,
    PricesRead,
    ProxyCreate,
    ProxyRead,
    ResolveCreate,
    StatusUpdate,
    TierUpdate,
)
from surge.operations.service import operations as operations_service
from surge.wallet.funds import funds as funds_service

router = APIRouter(prefix="/api/v1", tags=["operations"])
admin_router = APIRouter(prefix="/api/admin", tags=["operations admin"])
page_router = APIRouter(tags=["operations"])

Reseller = Annotated[Principal, Depends(require_role("reseller"))]
StatusFilter = Literal["queued", "running", "succeeded", "failed", "needs_review"]


# ---- reseller -----------------------------------------------------------------------------
@router.post(
    "/operations",
    status_code=202,
    openapi_extra=REQUIRED_HEADER_OPENAPI,
    response_model=OperationRead,
    responses={
        428: {"description": "Idempotency-Key missing: nothing was reserved"},
        409: {"description": "Insufficient credit"},
        422: {"description": "Invalid card, package or months"},
    },
)
async def create_operation(
    body: OperationCreate,
    request: Request,
    principal: Reseller,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    """Price the operation, reserve the credit and queue it (one transaction). Requires an
    ``Idempotency-Key``: the same key replays the first answer and never charges twice."""

    async def handler() -> Response:
        operation = await operations_service.create(
            session, runtime, principal.user_id, kind=body.kind, card=body.card,
            package=body.package, months=body.months, key=request.headers["Idempotency-Key"],
        )  # fmt: skip
        read = OperationRead.model_validate(operation).model_dump(mode="json")
        return JSONResponse(read, status_code=202)

    return await idempotency_keys.run(
        request, session, scope=f"user:{principal.user_id}", handler=handler, required=True
    )


@router.get("/operations", response_model=OperationPage)
async def list_operations(
    principal: Reseller,
    session: ReadSessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: StatusFilter | None = None,
) -> OperationPage:
    """The caller's operations, newest first."""
    rows, next_cursor = await operations_service.page(
        session, owner_id=principal.user_id, status=status, limit=limit, cursor=cursor
    )
    return OperationPage(
        items=[OperationRead.model_validate(r) for r in rows], next_cursor=next_cursor
    )


@router.get("/operations/prices", response_model=PricesRead)
async def get_prices(principal: Reseller, session: SessionDep, runtime: RuntimeDep) -> PricesRead:
    """The caller's tier, monthly price per package, and available credit."""
    tier, monthly = await operations_service.prices(session, principal.user_id)
    currency = runtime.settings.WALLET_CURRENCY
    available = await funds_service.available(session, principal.user_id, currency=currency)
    return PricesRead(
        tier=tier, currency=currency, monthly=monthly,
        signal=runtime.settings.OPERATIONS_SIGNAL_PRICE, available=available,
    )  # fmt: skip


@router.get("/operations/{operation_id}", response_model=OperationDetail)
async def get_operation(
    operation_id: UUID, principal: Reseller, session: SessionDep
) -> OperationDetail:
    """One of the caller's operations with its timeline of attempts (someone else's: 404)."""
    operation, attempts = await operations_service.get(
        session, operation_id, owner_id=principal.user_id
    )
    return OperationDetail(
        **OperationRead.model_validate(operation).model_dump(),
        attempts=[AttemptRead.model_validate(a) for a in attempts],
    )


# ---- admin --------------------------------------------------------------------------------
@admin_router.get("/provider-accounts", response_model=list[AccountRead])
async def list_accounts(admin: AdminMfa, session: ReadSessionDep) -> list[AccountRead]:
    """Provider accounts with their health (never their password)."""
    return [AccountRead.model_validate(a) for a in await operations_service.accounts(session)]


@admin_router.post("/provider-accounts", status_code=201, response_model=AccountRead)
async def add_account(
    body: AccountCreate, admin: AdminMfa, session: SessionDep, runtime: RuntimeDep,
    request: Request,
) -> AccountRead:  # fmt: skip
    """Add a provider account; the password is stored encrypted and never returned."""
    account = await operations_service.add_account(
        session, runtime, username=body.username, password=body.password.get_secret_value()
    )
    await audit_service.record(
        session, admin.user_id, action="operations.account.add", subject_type="provider_account",
        subject_id=str(account.id), after={"username": account.username},
        request_id=request_id(request),
    )  # fmt: skip
    return AccountRead.model_validate(account)


@admin_router.patch("/provider-accounts/{account_id}", response_model=AccountRead)
async def update_account(
    account_id: UUID, body: StatusUpdate, admin: AdminMfa, session: SessionDep, request: Request
) -> AccountRead:
    """Disable an account, or re-enable one (also one marked failed)."""
    account = await operations_service.set_account_status(session, account_id, status=body.status)
    await audit_service.record(
        session, admin.user_id, action="operations.account.status",
        subject_type="provider_account", subject_id=str(account_id),
        after={"status": body.status}, request_id=request_id(request),
    )  # fmt: skip
    return AccountRead.model_validate(account)


@admin_router.get("/proxies", response_model=list[ProxyRead])
async def list_proxies(admin: AdminMfa, session: ReadSessionDep) -> list[ProxyRead]:
    """Egress proxies: status, reason (PROXY_BLOCKED...), last error, blocks, cool-down end."""
    return [ProxyRead.model_validate(p) for p in await operations_service.proxies(session)]


@admin_router.post("/proxies", status_code=201, response_model=ProxyRead)
async def add_proxy(
    body: ProxyCreate, admin: AdminMfa, session: SessionDep, runtime: RuntimeDep,
    request: Request,
) -> ProxyRead:  # fmt: skip
    """Add an egress proxy; its URL (credentials included) is stored encrypted."""
    proxy = await operations_service.add_proxy(session, runtime, url=body.url.get_secret_value())
    await audit_service.record(
        session, admin.user_id, action="operations.proxy.add", subject_type="proxy",
        subject_id=str(proxy.id), after={"label": proxy.label}, request_id=request_id(request),
    )  # fmt: skip
    return ProxyRead.model_validate(proxy)


@admin_router.patch("/proxies/{proxy_id}", response_model=ProxyRead)
async def update_proxy(
    proxy_id: UUID, body: StatusUpdate, admin: AdminMfa, session: SessionDep, request: Request
) -> ProxyRead:
    """Disable a proxy, or put it back in service at once (skipping its cool-down)."""
    proxy = await operations_service.set_proxy_status(session, proxy_id, status=body.status)
    await audit_service.record(
        session, admin.user_id, action="operations.proxy.status", subject_type="proxy",
        subject_id=str(proxy_id), after={"status": body.status}, request_id=request_id(request),
    )  # fmt: skip
    return ProxyRead.model_validate(proxy)


@admin_router.get("/operations", response_model=AdminOperationPage)
async def list_all_operations(
    admin: AdminMfa,
    session: ReadSessionDep,
    status: StatusFilter | None = "needs_review",
    limit: Limit = 50,
    cursor: Cursor = None,
) -> AdminOperationPage:
    """Every reseller's operations by status (default: the review queue)."""
    rows, next_cursor = await operations_service.page(
        session, owner_id=None, status=status, limit=limit, cursor=cursor
    )
    return AdminOperationPage(
        items=[AdminOperationRead.model_validate(r) for r in rows], next_cursor=next_cursor
    )


@admin_router.post(
    "/operations/{operation_id}/resolve",
    response_model=AdminOperationRead,
    responses=APPROVAL_PENDING_RESPONSE,
)
async def resolve_operation(
    operation_id: UUID, body: ResolveCreate, *, admin: AdminMfa, session: SessionDep,
    runtime: RuntimeDep, request: Request,
) -> AdminOperationRead:  # fmt: skip
    """Decide an operation in review after checking with the provider: settle (it was done)
    or release (it was not). Audited. A release above ``APPROVAL_THRESHOLD`` waits for a
    second administrator (202, ADR 0059)."""
    operation = await operations_service.resolve(
        session, runtime, admin.user_id, operation_id, performed=body.performed, note=body.note,
        request_id=request_id(request),
    )  # fmt: skip
    return AdminOperationRead.model_validate(operation)


@admin_router.put("/resellers/{user_id}/tier", status_code=204)
async def set_tier(
    user_id: UUID, body: TierUpdate, admin: AdminMfa, session: SessionDep, request: Request
) -> Response:
    """The reseller's price tier (retail, silver, gold...)."""
    await operations_service.set_tier(session, user_id, tier=body.tier)
    await audit_service.record(
        session, admin.user_id, action="operations.reseller.tier", subject_type="user",
        subject_id=str(user_id), after={"tier": body.tier}, request_id=request_id(request),
    )  # fmt: skip
    return Response(status_code=204)


# ---- the reseller panel page --------------------------------------------------------------
@page_router.get("/panel", include_in_schema=False)
async def panel() -> Response:
    """The reseller panel: it holds no data, signs in and calls the API like any client."""
    html = resources.files("surge.operations").joinpath("static/panel.html").read_bytes()
    return Response(
        html,
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'self' 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
        },
    )
