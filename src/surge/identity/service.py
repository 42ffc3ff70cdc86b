"""Identity: accounts, sign-in, sessions and refresh rotation, plans and privileges.

    from surge.identity.service import identity as identity_service

    SurgeError
    └── IdentityError                  (each also derives from the kit error of its status)
        ├── InvalidCredentials (401)   wrong e-mail/password/code, bad or replayed refresh
        │                              token  (< NotAuthenticated: WWW-Authenticate: Bearer)
        ├── MfaRequired (401)          the account has MFA; send ``otp`` (``mfa_required``)
        ├── EmailTaken (409)           (< Conflict)
        └── UnknownPlan (422)          (``plans`` lists the configured ones)

The service is stateless: methods take the request's (or job's) session first, then the
``Runtime`` when they need this process's identity state (``surge.identity.runtime``: token
codec, hasher, privilege store, revocation list, login guard). They flush, never commit;
what must follow the commit (revocation announcements, cache invalidation, the login
guard's success) goes through ``on_commit``. The second factor is ``surge.identity.mfa``,
the rate-limit hook ``surge.identity.hook``, the audit log ``surge.audit``.

Rules worth knowing before changing anything here (ADR 0009):
- one refresh token per use (rotation); presenting a used one again revokes its session
  (RFC 9700 §4.14.2): the legitimate client and the thief are both signed out — that
  revocation is committed even though the request answers 401 (``keep_on_error``);
- at most ``AUTH_MAX_SESSIONS`` live sessions per user: the next login revokes the oldest;
- every revocation is committed to PostgreSQL first and announced after the commit (this
  process's memory, pub/sub to the others, Redis keys for their fallback), so it holds when
  Redis is down and is never announced for a transaction that rolled back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.service import audit as audit_service
from surge.identity import repository
from surge.identity.errors import (
    EmailTaken,
    IdentityError,
    InvalidCredentials,
    MfaRequired,
    UnknownPlan,
)
from surge.identity.mfa import mfa as mfa_service
from surge.identity.plans import Privileges
from surge.identity.principal import (
    PRINCIPAL_STATE,
    PRIVILEGES_STATE,
    MfaEnrollment,
    Principal,
    TokenPair,
)
from surge.identity.runtime import IdentityState, identity_state, key_ring
from surge.kit.db import keep_on_error, on_commit
from surge.kit.errors import NotFound
from surge.kit.runtime import Runtime
from surge.kit.security import hash_token, new_opaque_token
from surge.kit.security.confusables import normalize_email, skeleton
from surge.models.identity import AuthSession, RefreshToken, User
from surge.notifications.service import notifications as notifications_service

log = structlog.get_logger()

__all__ = [
    "PRINCIPAL_STATE",
    "PRIVILEGES_STATE",
    "REFRESH_LOCK_ID",
    "EmailTaken",
    "IdentityError",
    "IdentityService",
    "InvalidCredentials",
    "MfaEnrollment",
    "MfaRequired",
    "Principal",
    "TokenPair",
    "UnknownPlan",
    "audit",
    "identity",
    "key_ring",
]

#: pg advisory lock key: one view refresh at a time across every process.
REFRESH_LOCK_ID = 7_421_003


def _now() -> datetime:
    return datetime.now(UTC)


def _publish_after_commit(
    session: AsyncSession,
    state: IdentityState,
    sessions: Iterable[uuid.UUID],
    user_cutoff: tuple[uuid.UUID, datetime] | None = None,
) -> None:
    ids = list(sessions)
    if not ids and user_cutoff is None:
        return

    async def publish() -> None:
        await state.revocations.publish(ids, user_cutoff)

    on_commit(session, publish)


class IdentityService:
    """Identity's use cases (see the module docstring). Stateless."""

    # ---- accounts -----------------------------------------------------------------------
    async def register(
        self,
        session: AsyncSession,
        runtime: Runtime,
        *,
        email: str,
        password: str,
        role: str = "user",
    ) -> User:
        email = normalize_email(email)
        key = skeleton(email)
        if await repository.user_by_email(session, email) is not None:
            raise EmailTaken("An account with this e-mail already exists")
        if await repository.user_by_email_skeleton(session, key) is not None:
            raise EmailTaken("An account with a look-alike e-mail already exists")
        hashed = await identity_state(runtime).hasher.hash(password)
        user = User(email=email, email_skeleton=key, password_hash=hashed, role=role)
        try:
            async with session.begin_nested():  # a savepoint: the race below leaves no trace
                session.add(user)
                await session.flush()
        except IntegrityError as error:  # a concurrent registration won the unique index
            raise EmailTaken("An account with this e-mail already exists") from error
        await session.refresh(user)
        log.info("identity.user.registered", user_id=str(user.id), role=role)
        await notifications_service.send(
            session, to=email, user_id=user.id, template="welcome", context={"email": email},
            category="account", key=f"welcome:{user.id}",
        )  # fmt: skip
        return user

    async def notify_existing_account(self, session: AsyncSession, email: str) -> bool:
        """Someone tried to register ``email``, which has an account: tell its owner (at most
        once a day) instead of telling the caller (issue 16). A look-alike of an existing
        address reaches nobody: its owner is not the one who asked."""
        user = await repository.user_by_email(session, normalize_email(email))
        if user is None:
            log.info("identity.register.lookalike_refused")
            return False
        await notifications_service.send(
            session, to=user.email, user_id=user.id, template="account_exists",
            context={"email": user.email}, category="account",
            key=f"account-exists:{user.id}:{_now().date().isoformat()}",
        )  # fmt: skip
        log.info("identity.register.existing_account", user_id=str(user.id))
        return True

    async def find_user(self, session: AsyncSession, email: str) -> User | None:
        """The account registered with ``email`` (case-insensitive), if any."""
        return await repository.user_by_email(session, normalize_email(email))

    async def get_user(self, session: AsyncSession, user_id: uuid.UUID) -> User:
        user = await repository.user_by_id(session, user_id)
        if user is None:
            raise NotFound("User not found")
        return user

    async def me(self, runtime: Runtime, user_id: uuid.UUID) -> bytes:
        """``GET /me``'s ``UserRead`` JSON from the user cache tiers (memory → Redis →
        PostgreSQL): warm, it needs no pooled connection (issue 19, ADR 0016)."""
        return await identity_state(runtime).users.json(user_id)

    # ---- sign-in ------------------------------------------------------------------------
    async def login(
        self,
        session: AsyncSession,
        runtime: Runtime,
        *,
        email: str,
        password: str,
        otp: str | None = None,
        ip: str = "",
        user_agent: str | None = None,
        device_token: str | None = None,
    ) -> TokenPair:
        """Check the password (and the second factor when enrolled), open a session. The
        login budget counts the attempt a success only once the session is committed.

        A ``device_token`` trusted for this account (``surge.identity.devices``) puts the
        attempt on that device's failure budget instead of the account's (ADR 0044); any
        other token is ignored (the client is untrusted). It never replaces the second
        factor. A success returns a new device token."""
        state = identity_state(runtime)
        email = normalize_email(email)
        claims = state.devices.read(device_token)  # signature and expiry: CPU only
        user: User | None = None
        device: str | None = None
        if claims is not None:
            # The row the sign-in reads anyway, read before the reservation: which budget
            # to spend depends on whose token it is and whether it was revoked since.
            user = await repository.user_by_email(session, email)
            if user is not None:
                device = state.devices.trusted(claims, user.id, user.tokens_valid_after)
        # 429 once the failure budget (the device's, or the account's) is spent
        await state.login_guard.reserve(email, ip, device=device)
        outcome = "error"  # → the attempt is given back (second factor asked for, outage)
        try:
            if claims is None:
                user = await repository.user_by_email(session, email)
            if user is None:
                await state.hasher.verify_dummy(password)
                ok, new_hash = False, None
            else:
                ok, new_hash = await state.hasher.verify(user.password_hash, password)
            if user is None or not ok:
                outcome = "failed"
                log.info("identity.login.failed", ip=ip, trusted_device=device is not None)
                raise InvalidCredentials("Wrong e-mail or password")
            if new_hash is not None:
                user.password_hash = new_hash
                log.info("identity.password.rehashed", user_id=str(user.id))
            mfa = False
            if user.mfa_enabled:
                if not otp:
                    raise MfaRequired(
                        "This account requires a one-time code", extra={"mfa_required": True}
                    )
                if not await mfa_service.second_factor(session, state, user, otp):
                    outcome = "failed"
                    raise InvalidCredentials("Wrong or already used one-time code")
                mfa = True
            # Serialise this user's logins so the session cap cannot be raced past.
            await repository.user_by_id(session, user.id, for_update=True)
            now = _now()
            live = await repository.live_sessions(session, user.id, now=now)
            excess = len(live) - runtime.settings.AUTH_MAX_SESSIONS + 1
            evicted: list[uuid.UUID] = []
            if excess > 0:
                evicted = await repository.revoke_sessions(
                    session, [s.id for s in live[:excess]], now=now, reason="evicted"
                )
            agent = (user_agent or "")[:300] or None
            if await repository.is_new_device(session, user.id, agent):
                await notifications_service.send(
                    session, to=user.email, user_id=user.id, template="new_device",
                    context={"ip": ip, "user_agent": agent}, category="security",
                    key=f"new-device:{user.id}:{now.isoformat()}",
                )  # fmt: skip
            pair = await self._open_session(
                session, state, user, mfa=mfa, ip=ip, user_agent=user_agent, now=now
            )
            # Bound to the generation read above: a "log out everywhere" committed since
            # has already revoked it (it can only err towards untrusted).
            pair = replace(pair, device_token=state.devices.issue(user.id, user.tokens_valid_after))
            outcome = "ok"
        finally:
            if outcome == "error":
                await state.login_guard.release(email, ip, device=device)

        async def succeeded() -> None:
            await state.login_guard.succeeded(email, ip, device=device)

        on_commit(session, succeeded)
        _publish_after_commit(session, state, evicted)
        if evicted:
            log.info("identity.session.evicted", user_id=str(user.id), sessions=len(evicted))
        log.info(
            "identity.login.succeeded", user_id=str(user.id), mfa=mfa,
            trusted_device=device is not None,
        )  # fmt: skip
        return pair

    async def _open_session(
        self,
        session: AsyncSession,
        state: IdentityState,
        user: User,
        *,
        mfa: bool,
        ip: str,
        user_agent: str | None,
        now: datetime,
    ) -> TokenPair:
        auth = AuthSession(
            user_id=user.id,
            created_at=now,
            last_used_at=now,
            expires_at=now + state.settings.AUTH_REFRESH_TTL,
            mfa_verified=mfa,
            ip=ip or None,
            user_agent=(user_agent or "")[:300] or None,
        )
        session.add(auth)
        await session.flush()
        refresh = new_opaque_token()
        session.add(RefreshToken(token_hash=hash_token(refresh), session_id=auth.id))
        await session.flush()
        return TokenPair(
            access_token=state.access_token(user.id, auth.id, user.role, mfa),
            refresh_token=refresh,
            expires_in=int(state.codec.ttl),
            session_id=auth.id,
        )

    async def refresh(
        self, session: AsyncSession, runtime: Runtime, refresh_token: str
    ) -> TokenPair:
        """Rotate: the presented token is spent, a new one is returned. A spent token
        presented again revokes the whole session (the family), committed with the 401."""
        state = identity_state(runtime)
        found = await repository.refresh_token_for_update(session, hash_token(refresh_token))
        if found is None:
            raise InvalidCredentials("Unknown refresh token")
        token, auth = found
        now = _now()
        if auth.revoked_at is not None or auth.expires_at <= now:
            raise InvalidCredentials("This session has ended; sign in again")
        if token.used_at is not None:
            await repository.revoke_sessions(session, [auth.id], now=now, reason="refresh_reuse")
            log.warning(
                "identity.refresh.reuse_detected",
                user_id=str(auth.user_id), session_id=str(auth.id),
            )  # fmt: skip
            _publish_after_commit(session, state, [auth.id])
            keep_on_error(session)  # the revocation is the point: it survives the 401
            raise InvalidCredentials("Refresh token reused; the session has been revoked")
        user = await repository.user_by_id(session, auth.user_id)
        assert user is not None
        token.used_at = now
        auth.last_used_at = now
        auth.expires_at = now + runtime.settings.AUTH_REFRESH_TTL
        new_token = new_opaque_token()
        session.add(RefreshToken(token_hash=hash_token(new_token), session_id=auth.id))
        await session.flush()
        return TokenPair(
            access_token=state.access_token(user.id, auth.id, user.role, auth.mfa_verified),
            refresh_token=new_token,
            expires_in=int(state.codec.ttl),
            session_id=auth.id,
        )

    async def authenticate(self, runtime: Runtime, token: str) -> Principal:
        """Verify an access token and that its session is still live."""
        return await identity_state(runtime).authenticate(token)

    # ---- sessions -----------------------------------------------------------------------
    async def logout(
        self,
        session: AsyncSession,
        runtime: Runtime,
        principal: Principal,
        *,
        everywhere: bool = False,
    ) -> None:
        """End this session (or every session of the user) at once."""
        now = _now()
        if everywhere:
            # The user's row first: a login in flight (it holds the same lock) either
            # finishes before, and its session is among the live ones revoked here, or
            # starts after, and is a new sign-in that must work.
            user = await repository.user_by_id(session, principal.user_id, for_update=True)
            assert user is not None
            live = await repository.live_sessions(session, principal.user_id, now=now)
            ids = [s.id for s in live] + [principal.session_id]
            revoked = await repository.revoke_sessions(session, ids, now=now, reason="logout_all")
            # Access tokens carry whole-second `iat`: tokens of this very second are
            # covered by their sessions' revocation above, so the cut-off is the second
            # itself — a sign-in right after this one, in the same second, is valid.
            now = now.replace(microsecond=0)
            user.tokens_valid_after = now
            await session.flush()
        else:
            revoked = await repository.revoke_sessions(
                session, [principal.session_id], now=now, reason="logout"
            )
        _publish_after_commit(
            session,
            identity_state(runtime),
            {*revoked, principal.session_id},
            (principal.user_id, now) if everywhere else None,
        )
        log.info("identity.logout", user_id=str(principal.user_id), everywhere=everywhere)

    async def revoke_session(
        self,
        session: AsyncSession,
        runtime: Runtime,
        principal: Principal,
        session_id: uuid.UUID,
    ) -> None:
        """Sign out one of the caller's own devices."""
        auth = await repository.user_session(session, session_id)
        if auth is None or auth.user_id != principal.user_id:
            raise NotFound("Session not found")
        await repository.revoke_sessions(session, [session_id], now=_now(), reason="revoked")
        _publish_after_commit(session, identity_state(runtime), [session_id])

    async def sessions_page(
        self, session: AsyncSession, principal: Principal, *, limit: int, cursor: str | None
    ) -> tuple[list[AuthSession], str | None]:
        """The caller's live sessions, oldest first."""
        found = await repository.session_page(
            session, principal.user_id, now=_now(), limit=limit, cursor=cursor
        )
        return found.items, found.next_cursor

    # ---- plans and privileges -----------------------------------------------------------
    async def change_plan(
        self,
        session: AsyncSession,
        runtime: Runtime,
        actor_id: uuid.UUID | None,
        *,
        user_id: uuid.UUID,
        plan: str,
        expires_at: datetime | None,
        request_id: str | None = None,
    ) -> None:
        """Set a user's plan, audited; every cache forgets the user once this commits."""
        state = identity_state(runtime)
        if plan not in state.catalog:
            raise UnknownPlan(
                f"Unknown plan {plan!r}", extra={"plans": sorted(state.catalog.plans)}
            )
        if await repository.user_by_id(session, user_id) is None:
            raise NotFound("User not found")
        current = await repository.subscription_for_update(session, user_id)
        before = (
            {"plan": current.plan, "expires_at": _iso(current.expires_at)}
            if current is not None
            else {"plan": "free", "expires_at": None}
        )
        await repository.upsert_subscription(session, user_id, plan=plan, expires_at=expires_at)
        await audit_service.record(
            session,
            actor_id,
            action="identity.plan.changed",
            subject_type="user",
            subject_id=str(user_id),
            before=before,
            after={"plan": plan, "expires_at": _iso(expires_at)},
            request_id=request_id,
        )
        state.privileges.invalidate_on_commit(session, user_id)
        log.info("identity.plan.changed", user_id=str(user_id), plan=plan)

    async def active_users(self, session: AsyncSession, *, within: timedelta) -> int:
        """Users who used a session within ``within`` (admin metrics)."""
        return await repository.active_user_count(session, datetime.now(UTC) - within)

    async def clear_privilege_cache(self, runtime: Runtime) -> str:
        """Forget every cached privilege in every process (O(1): a namespace bump); returns
        the cache's name."""
        cache = identity_state(runtime).privileges.cache
        await cache.clear()
        return str(cache.stats()["name"])

    def client_ip(self, runtime: Runtime, scope: Any) -> str:
        """The client address behind trusted proxies (``TRUSTED_PROXIES``): the per-IP
        login budget must count the caller, not the load balancer."""
        return identity_state(runtime).client_ip(scope)

    def access_ttl(self, runtime: Runtime) -> int:
        """Seconds an access token lives."""
        return int(identity_state(runtime).codec.ttl)

    def privilege_cache_stats(self, runtime: Runtime) -> dict[str, Any]:
        return identity_state(runtime).privileges.cache.stats()

    async def privileges_of(self, runtime: Runtime, user_id: uuid.UUID) -> Privileges:
        return await identity_state(runtime).privileges.get(user_id)

    async def privileges_many(
        self, runtime: Runtime, user_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, Privileges]:
        return await identity_state(runtime).privileges.get_many(user_ids)

    async def has_privilege(self, runtime: Runtime, user_id: uuid.UUID, feature: str) -> bool:
        return await identity_state(runtime).privileges.has_privilege(user_id, feature)

    async def rate_tier(self, runtime: Runtime, user_id: uuid.UUID) -> str:
        """The caller's rate-limit tier (plan → ``IDENTITY_PLAN_RATE_TIERS``)."""
        return (await identity_state(runtime).privileges.get(user_id)).rate_tier

    async def refresh_view(self, session: AsyncSession, *, min_age: float = 0.0) -> bool:
        """``REFRESH MATERIALIZED VIEW CONCURRENTLY active_subscriptions`` (seed 003), at most
        one at a time across processes and not more often than ``min_age`` seconds; the
        refresh time is recorded for the read path's overlay. A periodic refresh
        (``min_age`` > 0) is skipped when it would change nothing a reader sees
        (``repository.active_subscriptions_unchanged``). Returns whether it ran."""
        if not await repository.try_view_refresh_lock(session, REFRESH_LOCK_ID):
            return False
        if min_age > 0 and await repository.view_refreshed_within(
            session, "active_subscriptions", min_age
        ):
            return False
        if min_age > 0 and await repository.active_subscriptions_unchanged(session):
            # A periodic refresh with nothing to fold in: skipped, and the refresh mark is
            # left where it is (moving it could hide a write that commits right now).
            log.info("identity.view_refresh_skipped", view="active_subscriptions")
            return False
        started = time.perf_counter()
        await repository.refresh_active_subscriptions(session)
        log.info(
            "identity.view_refreshed",
            view="active_subscriptions",
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return True


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


identity = IdentityService()

#: Compatibility for code written before ``surge.audit`` (other branches in flight):
#: ``await audit(session, actor_id, action=..., ...)``. New code uses
#: ``surge.audit.service.audit.record``.
audit = audit_service.record
