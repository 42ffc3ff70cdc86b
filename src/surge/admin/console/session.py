"""The console's sign-in: a server-side session behind an HttpOnly, SameSite=Strict cookie.

The cookie holds only a random id; Redis holds the session (the identity tokens it signed in
with, its CSRF token, its stage). Each request re-authenticates the access token through
identity (revocation, "log out everywhere" and session caps apply to the console too) and
refreshes it when it expired. Every form carries the session's CSRF token; every POST must
also come from this origin (``Origin``/``Sec-Fetch-Site``): a cross-site form post is
refused even by a browser that would send the cookie.

    ConsoleError (SurgeError)
    ├── ConsoleSignInRequired (401)   no or expired console session
    ├── ConsoleForbidden (403)        a read-only administrator tried to act
    └── CrossSiteRefused (403)        a POST from another origin, or a wrong CSRF token
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from fastapi import Request
from starlette.responses import Response

from surge.identity.principal import Principal
from surge.identity.runtime import identity_state
from surge.identity.service import identity as identity_service
from surge.kit.errors import Forbidden, NotAuthenticated, SurgeError
from surge.kit.runtime import Runtime
from surge.kit.security import InvalidToken

COOKIE = "surge_console"
PRE_COOKIE = "surge_console_pre"  # the sign-in form's CSRF token, before any session
KEY = "surge:console:session:"
SESSION_STATE = "console_session"  # the session the rate-limit hook read (ratelimit.py)
ADMIN_ROLES = frozenset({"admin", "admin_readonly"})


class ConsoleError(SurgeError):
    pass


class ConsoleSignInRequired(ConsoleError, NotAuthenticated):
    pass


class ConsoleForbidden(ConsoleError, Forbidden):
    pass


class CrossSiteRefused(ConsoleError, Forbidden):
    pass


@dataclass
class ConsoleSession:
    id: str
    access: str
    refresh: str
    csrf: str
    email: str
    stage: str  # "enrol" (MFA to set up) | "verify" (code to enter) | "ready"

    def dump(self) -> bytes:
        return orjson.dumps(asdict(self))


@dataclass(frozen=True)
class Caller:
    """The signed-in operator of one console request."""

    session: ConsoleSession
    principal: Principal

    @property
    def can_act(self) -> bool:
        return self.principal.role == "admin"

    @property
    def role_label(self) -> str:
        return "administrator" if self.can_act else "read-only administrator"


def session_key(session_id: str) -> str:
    return KEY + hashlib.sha256(session_id.encode()).hexdigest()


async def save(runtime: Runtime, session: ConsoleSession) -> None:
    ttl = int(runtime.settings.CONSOLE_SESSION_TTL.total_seconds())
    async with runtime.redis.guard() as redis:
        await redis.set(session_key(session.id), session.dump(), ex=ttl)


async def load(runtime: Runtime, request: Request) -> ConsoleSession | None:
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        return None
    found = request.scope.get("state", {}).get(SESSION_STATE)
    if isinstance(found, ConsoleSession) and found.id == session_id:
        return found  # read moments ago by the rate-limit hook (ratelimit.py)
    return await load_by_id(runtime, session_id)


async def load_by_id(runtime: Runtime, session_id: str) -> ConsoleSession | None:
    """The session a cookie names, or None (unknown, expired or signed out)."""
    async with runtime.redis.guard() as redis:
        raw = await redis.get(session_key(session_id))
    return ConsoleSession(**orjson.loads(raw)) if raw else None


async def drop(runtime: Runtime, session: ConsoleSession) -> None:
    async with runtime.redis.guard() as redis:
        await redis.delete(session_key(session.id))


def new_session(access: str, refresh: str, email: str, stage: str) -> ConsoleSession:
    return ConsoleSession(
        id=secrets.token_urlsafe(32),
        access=access,
        refresh=refresh,
        csrf=secrets.token_urlsafe(24),
        email=email,
        stage=stage,
    )


def set_cookie(response: Response, name: str, value: str, runtime: Runtime) -> None:
    response.set_cookie(
        name,
        value,
        max_age=int(runtime.settings.CONSOLE_SESSION_TTL.total_seconds()),
        path="/admin",
        httponly=True,
        samesite="strict",
        secure=runtime.settings.is_production,
    )


async def principal_of(runtime: Runtime, session: ConsoleSession) -> Principal | None:
    """The session's principal, refreshing its access token once if it expired (the
    rotation is its own unit of work: the console's cookie outlives one access token)."""
    state = identity_state(runtime)
    try:
        return await state.authenticate(session.access)
    except InvalidToken:
        pass
    try:
        async with runtime.db.session() as db:
            pair = await identity_service.refresh(db, runtime, session.refresh)
    except SurgeError:
        return None
    session.access, session.refresh = pair.access_token, pair.refresh_token
    await save(runtime, session)
    try:
        return await state.authenticate(session.access)
    except InvalidToken:
        return None


def same_origin(request: Request) -> bool:
    """A POST from a page of this origin (what browsers say in ``Origin`` and
    ``Sec-Fetch-Site``); a request that says neither (curl, a test client) passes here and
    still needs the CSRF token."""
    if request.headers.get("sec-fetch-site", "same-origin") not in {"same-origin", "none"}:
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def read_form(request: Request) -> dict[str, list[str]]:
    """``application/x-www-form-urlencoded`` fields (the console's forms post nothing else)."""
    body = await request.body()
    if len(body) > 64_000:
        raise CrossSiteRefused("Form too large")
    return parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)


def check_csrf(expected: str, form: dict[str, list[str]]) -> None:
    sent = (form.get("csrf") or [""])[0]
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CrossSiteRefused("The form's CSRF token is missing or wrong; reload the page")


def first(form: dict[str, list[str]], name: str, default: str = "") -> str:
    return (form.get(name) or [default])[0].strip()


def as_dict(form: dict[str, list[str]]) -> dict[str, Any]:
    return {k: v if len(v) > 1 else v[0] for k, v in form.items() if k not in {"csrf"}}
