"""kit.ratelimit's ``identify`` hook for identity: the caller's user id and plan tier.

The plan selects the policy (seed 004: 300/500/1 000 per 15 min). The token is fully
authenticated here (signature, expiry, revocation); an invalid or signed-out token is
anonymous: it spends the client IP's budget. The principal and privileges it loads are left
in the request state for the route to reuse (``current_user``, ``/me/privileges``).

Hot path (ADR 0011, 0012): the common case answers from memory without a coroutine.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from surge.identity.plans import Privileges
from surge.identity.principal import PRINCIPAL_STATE, PRIVILEGES_STATE, Principal
from surge.identity.runtime import IdentityState
from surge.kit.errors import DependencyUnavailable
from surge.kit.ratelimit import Identify, Subject
from surge.kit.security import InvalidToken


class RateLimitHook:
    """``hook.subject`` is what ``RateLimiter.identify`` calls for each request."""

    def __init__(self, state: IdentityState) -> None:
        self.state = state
        self._principal_of = state.principal_of
        self._revocations = state.revocations
        self._privileges = state.privileges
        #: Who a request without a bearer token is (a console session cookie: ADR 0054);
        #: None: anonymous. Asked only then, so a bearer request pays nothing for it.
        self.otherwise: Identify | None = None

    def subject(self, scope: Any) -> Subject | Awaitable[Subject | None] | None:
        token = _bearer(scope)
        if token is None:
            otherwise = self.otherwise
            return None if otherwise is None else otherwise(scope)
        return self.of_token(token, scope)

    def of_token(self, token: str, scope: Any) -> Subject | Awaitable[Subject | None] | None:
        """The subject of an access token however it came (a bearer header, or a console
        session holding one): verified, revocation included; None (anonymous) if invalid."""
        try:
            principal = self._principal_of(token)
        except InvalidToken:
            return None
        # A trusted revocation list and the caller's privileges already built answer
        # without a coroutine (ADR 0006, bench/privileges.py).
        revoked = self._revocations.revoked_now(
            principal.session_id, principal.user_id, principal.issued_at
        )
        if revoked is not None:
            if revoked:
                return None  # a signed-out token buys no user tier: anonymous, per IP
            privileges = self._privileges.peek(principal.user_id)
            if privileges is not None:
                return admit(scope, principal, privileges)
        return self._subject(principal, scope)

    async def _subject(self, principal: Principal, scope: Any) -> Subject | None:
        try:
            if await self._revocations.is_revoked(
                principal.session_id, principal.user_id, principal.issued_at
            ):
                return None  # a signed-out token buys no user tier: anonymous, per IP
            privileges = await self._privileges.get(principal.user_id)
        except DependencyUnavailable:
            # Cannot tell (Redis and PostgreSQL both down, or no pool connection for the
            # plan): the route's own check answers 503. Not anonymous: every signed-in caller
            # behind one address would then share the anonymous per-IP budget, and an outage
            # would turn into 429s for everyone (issue 20). The signature is verified, so the
            # budget is this token's user's own, under the tier no plan policy names: only
            # the per-subject limits apply.
            return Subject(principal.key, UNVERIFIED_TIER)
        return admit(scope, principal, privileges)


#: The rate-limit tier of a signed-in caller whose session cannot be checked right now.
UNVERIFIED_TIER = "unverified"


def admit(scope: Any, principal: Principal, privileges: Privileges) -> Subject:
    """The limiter's subject for a live principal; both are left in the request state for
    the route (``current_user`` and ``/me/privileges`` reuse them)."""
    state = scope.setdefault("state", {})
    state[PRIVILEGES_STATE] = privileges
    state[PRINCIPAL_STATE] = principal
    return Subject(principal.key, privileges.rate_tier)


def _bearer(scope: Any) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            # "Bearer <token>", the scheme in any case; one slice and one decode instead of
            # decode, partition, lower and two strips (ADR 0023).
            if value[:7].lower() != b"bearer ":
                return None
            token = bytes(value[7:]).decode("latin-1").strip()
            return token or None
    return None
