"""Dependencies other modules import to protect their routes.

    from surge.identity.deps import CurrentUser, require_admin_mfa, require_role

- ``current_user``: a valid, unrevoked access token (401 problem+json otherwise);
- ``require_role("partner", "admin")``: one of those roles (403 otherwise);
- ``require_admin_mfa``: an admin whose session passed MFA (seed 004) — use it on every
  ``/api/admin`` router: ``APIRouter(dependencies=[Depends(require_admin_mfa)])``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from surge.identity.principal import PRINCIPAL_STATE, Principal
from surge.identity.runtime import IdentityState, identity_state
from surge.kit.db.replicas import bind_reader
from surge.kit.errors import Forbidden
from surge.kit.security import InvalidToken

log = structlog.get_logger()

__all__ = [
    "AdminMfa",
    "CurrentUser",
    "Principal",
    "bearer_token",
    "bind_principal",
    "current_user",
    "require_admin_mfa",
    "require_role",
]


def _state(request: Request) -> IdentityState:
    return identity_state(request.app.state.runtime)


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("Bearer token required")
    return token.strip()


#: Declares the bearer scheme in OpenAPI (``securitySchemes`` and each protected operation's
#: ``security``); the token itself is read by ``bearer_token`` (issue 16).
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    bearerFormat="JWT",
    description="An access token from POST /api/v1/auth/login (admin routes: one whose "
    "session passed MFA).",
)


async def current_user(
    request: Request,
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)] = None,
) -> Principal:
    """The authenticated caller; also stored on ``request.state.principal`` for middleware
    and logs (the rate limiter reads it to pick the caller's tier)."""
    state = request.scope.setdefault("state", {})
    live: Principal | None = state.get(PRINCIPAL_STATE)
    if live is not None:  # this request's token, authenticated by the rate-limit hook
        principal = live
    else:
        principal = await _state(request).authenticate(bearer_token(request))
    bind_principal(state, principal)
    return principal


def bind_principal(state: dict[str, Any], principal: Principal) -> None:
    """Leave the caller where middleware and logs look: ``request.state.principal`` and the
    log context's ``user_id``."""
    state["principal"] = principal
    _USER_ID_VAR.set(principal.key)
    bind_reader(principal.key)  # read-your-writes on replicas (ADR 0022)


#: structlog's own context variable for ``user_id`` (what ``bind_contextvars`` sets), set
#: directly: ``bind_contextvars`` builds a dict and looks the variable up by name on every
#: authenticated request (ADR 0023).
_USER_ID_VAR = structlog.contextvars.bind_contextvars(user_id=...)["user_id"].var


CurrentUser = Annotated[Principal, Depends(current_user)]


def require_role(*roles: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that lets only ``roles`` through."""
    allowed = frozenset(roles)

    async def dependency(principal: CurrentUser) -> Principal:
        if principal.role not in allowed:
            raise Forbidden("Your role does not allow this")
        return principal

    return dependency


async def require_admin_mfa(principal: CurrentUser) -> Principal:
    """An admin whose current session passed a second factor (seed 004: TOTP for admins)."""
    if principal.role != "admin":
        raise Forbidden("Administrators only")
    if not principal.mfa:
        raise Forbidden(
            "Multi-factor authentication is required for administration",
            extra={"mfa_required": True},
        )
    return principal


AdminMfa = Annotated[Principal, Depends(require_admin_mfa)]
