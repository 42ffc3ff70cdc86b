"""Who a console request is, for the rate limiter: the signed-in operator, not the client IP.

The console signs in with a session cookie, not a bearer token, so identity's hook alone saw
every console click as anonymous: 50 requests per 15 min per IP, a few dozen clicks behind
one office address (ADR 0054). ``console_subject`` is the hook's ``otherwise``: asked only
for a request without a bearer token (a bearer request pays nothing for it), on the
console's own paths (the only ones the browser sends the cookie to). The session is read from
Redis as the console reads it, must be signed in (stage ``ready``), and its access token goes
through identity's checks (signature, expiry, revocation, privileges) and must be an
administrator's with MFA, as ``current_caller`` requires. Anything else — a forged, expired,
signed-out or half-signed-in cookie — is anonymous, per IP, as before.

The session read is left in the request state: ``session.load`` reuses it, so a console page
still reads its session from Redis once.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from starlette.requests import cookie_parser

from surge.admin.console.session import (
    ADMIN_ROLES,
    COOKIE,
    SESSION_STATE,
    load_by_id,
)
from surge.identity.hook import RateLimitHook
from surge.identity.principal import PRINCIPAL_STATE, PRIVILEGES_STATE
from surge.kit.errors import DependencyUnavailable
from surge.kit.ratelimit import Identify, Subject
from surge.kit.runtime import Runtime

PREFIX = "/admin"


def console_subject(runtime: Runtime, hook: RateLimitHook) -> Identify:
    """``hook.otherwise``: a request without a bearer token, as its console session."""

    def subject(scope: Any) -> Subject | Awaitable[Subject | None] | None:
        path: str = scope.get("path", "")
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            return None
        session_id = _cookie(scope)
        if not session_id:
            return None
        return _from_session(runtime, hook, session_id, scope)

    return subject


async def _from_session(
    runtime: Runtime, hook: RateLimitHook, session_id: str, scope: Any
) -> Subject | None:
    try:
        session = await load_by_id(runtime, session_id)
    except DependencyUnavailable:
        return None  # the page itself answers 503 (it reads the same session)
    if session is None:
        return None  # forged, expired or signed out: anonymous
    state = scope.setdefault("state", {})
    state[SESSION_STATE] = session
    if session.stage != "ready":
        return None
    found = hook.of_token(session.access, scope)
    if found is not None and not isinstance(found, Subject):
        found = await found
    if found is None:
        # An expired access token (the page refreshes it) or a revoked one: anonymous.
        return None
    principal = state.get(PRINCIPAL_STATE)
    if principal is not None and (principal.role not in ADMIN_ROLES or not principal.mfa):
        state.pop(PRINCIPAL_STATE, None)
        state.pop(PRIVILEGES_STATE, None)
        return None
    return found


def _cookie(scope: Any) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            return cookie_parser(bytes(value).decode("latin-1")).get(COOKIE)
    return None
