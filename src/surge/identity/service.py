"""Identity: accounts, sign-in, sessions and refresh rotation, MFA, plans, audit.

    SurgeError
    └── IdentityError                  (each also derives from the kit error of its status)
        ├── InvalidCredentials (401)   wrong e-mail/password/code, bad or replayed refresh
        │                              token  (< NotAuthenticated: WWW-Authenticate: Bearer)
        ├── MfaRequired (401)          the account has MFA; send ``otp`` (``mfa_required``)
        ├── EmailTaken (409)           (< Conflict)
        └── UnknownPlan (422)          (``plans`` lists the configured ones)

Rules worth knowing before changing anything here (ADR 0009):
- one refresh token per use (rotation); presenting a used one again revokes its session
  (RFC 9700 §4.14.2): the legitimate client and the thief are both signed out;
- at most ``AUTH_MAX_SESSIONS`` live sessions per user: the next login revokes the oldest;
- every revocation is committed to PostgreSQL first and announced after the commit (this
  process's memory, pub/sub to the others, Redis keys for their fallback), so it holds when
  Redis is down and is never announced for a transaction that rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from surge.config import Settings
from surge.identity import repository
from surge.identity.plans import Catalog, Privileges
from surge.identity.privileges import PrivilegeStore
from surge.identity.security import LoginGuard, RevocationList
from surge.kit.cache import Cache
from surge.kit.db import Database
from surge.kit.errors import (
    Conflict,
    DependencyUnavailable,
    NotAuthenticated,
    NotFound,
    SurgeError,
)
from surge.kit.ratelimit import Subject
from surge.kit.redis import RedisGateway
from surge.kit.security import (
    BackupCodes,
    InvalidToken,
    KeyRing,
    PasswordHasher,
    TokenCodec,
    Totp,
    hash_token,
    new_opaque_token,
)
from surge.kit.security.confusables import normalize_email, skeleton
from surge.kit.web.client_ip import ClientIpResolver
from surge.models.identity import AuthSession, RefreshToken, User

log = structlog.get_logger()

#: Request-state key under which the rate-limit hook leaves the caller's privileges.
PRIVILEGES_STATE = "identity_privileges"
#: The principal the rate-limit hook already authenticated for this request (signature,
#: expiry and revocation), so ``current_user`` does not check the same token twice.
PRINCIPAL_STATE = "identity_live_principal"
#: pg advisory lock key: one view refresh at a time across every process.
REFRESH_LOCK_ID = 7_421_003


class IdentityError(SurgeError):
    """Base of identity's own errors."""


class InvalidCredentials(IdentityError, NotAuthenticated):
    status_code = 401
    title = "Unauthorized"


class MfaRequired(IdentityError, NotAuthenticated):
    status_code = 401
    title = "Unauthorized"


class EmailTaken(IdentityError, Conflict):
    status_code = 409
    title = "Conflict"


class UnknownPlan(IdentityError):
    status_code = 422
    title = "Unprocessable Content"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    user_id: uuid.UUID
    session_id: uuid.UUID
    role: str
    mfa: bool
    issued_at: float

    @cached_property
    def key(self) -> str:
        """``str(user_id)``, formatted once per token (principals are memoised per token)."""
        return str(self.user_id)


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    session_id: uuid.UUID


@dataclass(frozen=True)
class MfaEnrollment:
    secret: str
    provisioning_uri: str
    backup_codes: list[str]


def key_ring(settings: Settings) -> KeyRing:
    spec = settings.AUTH_SIGNING_KEYS.get_secret_value()
    if spec:
        return KeyRing.parse(spec)
    return KeyRing.derived(settings.SECRET_KEY.get_secret_value())


def _now() -> datetime:
    return datetime.now(UTC)


class Identity:
    """The identity service of one process (kept in ``runtime.extensions["identity"]``)."""

    def __init__(self, db: Database, redis: RedisGateway, settings: Settings) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings
        self.codec = TokenCodec(
            key_ring(settings),
            issuer=settings.AUTH_JWT_ISSUER,
            audience=settings.AUTH_JWT_AUDIENCE,
            ttl=settings.AUTH_ACCESS_TTL.total_seconds(),
        )
        self.hasher = PasswordHasher(
            time_cost=settings.AUTH_ARGON2_TIME_COST,
            memory_cost=settings.AUTH_ARGON2_MEMORY_KIB,
            parallelism=settings.AUTH_ARGON2_PARALLELISM,
        )
        self.totp = Totp(issuer=settings.AUTH_MFA_ISSUER)
        self.backup_codes = BackupCodes(
            settings.SECRET_KEY.get_secret_value().encode() + b".mfa-backup"
        )
        self.catalog = Catalog.from_settings(settings)
        self.privileges = PrivilegeStore(
            db,
            Cache(
                redis,
                name="privileges",
                namespace="surge:identity:priv",
                l1_max_entries=settings.IDENTITY_PRIVILEGE_L1_SIZE,
                l1_ttl=settings.IDENTITY_PRIVILEGE_L1_TTL.total_seconds(),
                ttl=settings.IDENTITY_PRIVILEGE_TTL.total_seconds(),
                max_stale=settings.IDENTITY_PRIVILEGE_STALE.total_seconds(),
                resync_interval=settings.CACHE_RESYNC_INTERVAL.total_seconds(),
                lease=settings.CACHE_LEASE.total_seconds(),
            ),
            self.catalog,
        )
        self.revocations = RevocationList(
            db, redis, access_ttl=settings.AUTH_ACCESS_TTL.total_seconds()
        )
        self.login_guard = LoginGuard(
            redis,
            window=settings.AUTH_LOGIN_WINDOW.total_seconds(),
            max_per_account=settings.AUTH_LOGIN_MAX_FAILURES_ACCOUNT,
            max_per_ip=settings.AUTH_LOGIN_MAX_FAILURES_IP,
        )
        self._principals: OrderedDict[str, Principal] = OrderedDict()
        self.client_ip = ClientIpResolver(settings.TRUSTED_PROXIES)
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self, *, warm: bool = True, refresh_view: bool = True) -> None:
        """Subscribe to invalidations, warm the privilege cache, start the view refresher."""
        await self.revocations.start()
        await self.privileges.start()
        if warm and self.settings.IDENTITY_WARM_USERS > 0:
            try:
                warmed = await self.privileges.warm(self.settings.IDENTITY_WARM_USERS)
                log.info("identity.privileges.warmed", users=warmed)
            except Exception as error:  # a cold cache is slower, not broken
                log.warning("identity.privileges.warm_failed", error=str(error)[:200])
        if refresh_view:
            self._tasks.append(
                asyncio.create_task(self._refresh_forever(), name="identity-view-refresh")
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.privileges.close()
        await self.revocations.close()

    async def _refresh_forever(self) -> None:
        # The worker fleet runs this as the periodic job ``identity.active_subscriptions.refresh``
        # (surge.identity.jobs). Web processes keep this loop too, so a deployment without
        # workers (``surge serve`` alone) still refreshes; the advisory lock and the
        # "refreshed recently" check keep the cluster at one refresh per interval.
        interval = self.settings.IDENTITY_REFRESH_INTERVAL.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                await refresh_active_subscriptions(self.db, min_age=interval * 0.9)
            except Exception as error:
                log.warning("identity.view_refresh_failed", error=str(error)[:200])

    # ---- accounts -----------------------------------------------------------------------
    async def register(
        self, session: AsyncSession, *, email: str, password: str, role: str = "user"
    ) -> User:
        email = normalize_email(email)
        key = skeleton(email)
        if await repository.user_by_email(session, email) is not None:
            raise EmailTaken("An account with this e-mail already exists")
        if await repository.user_by_email_skeleton(session, key) is not None:
            raise EmailTaken("An account with a look-alike e-mail already exists")
        user = User(
            email=email,
            email_skeleton=key,
            password_hash=await self.hasher.hash(password),
            role=role,
        )
        try:
            async with session.begin_nested():  # a savepoint: the race below leaves no trace
                session.add(user)
                await session.flush()
        except IntegrityError as error:  # a concurrent registration won the unique index
            raise EmailTaken("An account with this e-mail already exists") from error
        log.info("identity.user.registered", user_id=str(user.id), role=role)
        return user

    async def get_user(self, session: AsyncSession, user_id: uuid.UUID) -> User:
        user = await repository.user_by_id(session, user_id)
        if user is None:
            raise NotFound("User not found")
        return user

    # ---- sign-in ------------------------------------------------------------------------
    async def login(
        self,
        *,
        email: str,
        password: str,
        otp: str | None = None,
        ip: str = "",
        user_agent: str | None = None,
    ) -> TokenPair:
        """Check the password (and the second factor when enrolled), open a session."""
        email = normalize_email(email)
        await self.login_guard.reserve(email, ip)  # 429 once the failure budget is spent
        outcome = "error"  # → the attempt is given back (second factor asked for, outage)
        try:
            evicted: list[uuid.UUID] = []
            async with self.db.session() as session:
                user = await repository.user_by_email(session, email)
                if user is None:
                    await self.hasher.verify_dummy(password)
                    ok, new_hash = False, None
                else:
                    ok, new_hash = await self.hasher.verify(user.password_hash, password)
                if user is None or not ok:
                    outcome = "failed"
                    log.info("identity.login.failed", ip=ip)
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
                    if not await self._second_factor(session, user, otp):
                        outcome = "failed"
                        raise InvalidCredentials("Wrong or already used one-time code")
                    mfa = True
                # Serialise this user's logins so the session cap cannot be raced past.
                await repository.user_by_id(session, user.id, for_update=True)
                now = _now()
                live = await repository.live_sessions(session, user.id, now=now)
                excess = len(live) - self.settings.AUTH_MAX_SESSIONS + 1
                if excess > 0:
                    evicted = await repository.revoke_sessions(
                        session, [s.id for s in live[:excess]], now=now, reason="evicted"
                    )
                pair = await self._open_session(
                    session, user, mfa=mfa, ip=ip, user_agent=user_agent, now=now
                )
            outcome = "ok"
        finally:
            if outcome == "ok":
                await self.login_guard.succeeded(email, ip)
            elif outcome == "error":
                await self.login_guard.release(email, ip)
        if evicted:
            await self.revocations.publish(evicted)
            log.info("identity.session.evicted", user_id=str(user.id), sessions=len(evicted))
        log.info("identity.login.succeeded", user_id=str(user.id), mfa=mfa)
        return pair

    async def _open_session(
        self,
        session: AsyncSession,
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
            expires_at=now + self.settings.AUTH_REFRESH_TTL,
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
            access_token=self._access_token(user.id, auth.id, user.role, mfa),
            refresh_token=refresh,
            expires_in=int(self.codec.ttl),
            session_id=auth.id,
        )

    def _access_token(self, user_id: uuid.UUID, session_id: uuid.UUID, role: str, mfa: bool) -> str:
        return self.codec.issue(
            str(user_id),
            {
                "sid": str(session_id),
                "role": role,
                "mfa": mfa,
                "amr": ["pwd", "otp"] if mfa else ["pwd"],
            },
        )

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate: the presented token is spent, a new one is returned. A spent token
        presented again revokes the whole session (the family)."""
        reused: uuid.UUID | None = None
        pair: TokenPair | None = None
        async with self.db.session() as session:
            found = await repository.refresh_token_for_update(session, hash_token(refresh_token))
            if found is None:
                raise InvalidCredentials("Unknown refresh token")
            token, auth = found
            now = _now()
            if auth.revoked_at is not None or auth.expires_at <= now:
                raise InvalidCredentials("This session has ended; sign in again")
            if token.used_at is not None:
                await repository.revoke_sessions(
                    session, [auth.id], now=now, reason="refresh_reuse"
                )
                reused = auth.id
                log.warning(
                    "identity.refresh.reuse_detected",
                    user_id=str(auth.user_id), session_id=str(auth.id),
                )  # fmt: skip
            else:
                user = await repository.user_by_id(session, auth.user_id)
                assert user is not None
                token.used_at = now
                auth.last_used_at = now
                auth.expires_at = now + self.settings.AUTH_REFRESH_TTL
                new_token = new_opaque_token()
                session.add(RefreshToken(token_hash=hash_token(new_token), session_id=auth.id))
                await session.flush()
                pair = TokenPair(
                    access_token=self._access_token(user.id, auth.id, user.role, auth.mfa_verified),
                    refresh_token=new_token,
                    expires_in=int(self.codec.ttl),
                    session_id=auth.id,
                )
        if reused is not None:  # committed above: the revocation survives the 401
            await self.revocations.publish([reused])
            raise InvalidCredentials("Refresh token reused; the session has been revoked")
        assert pair is not None
        return pair

    async def authenticate(self, token: str) -> Principal:
        """Verify an access token and that its session is still live."""
        return await self.check_live(self.principal_of(token))

    async def check_live(self, principal: Principal) -> Principal:
        """``principal`` (from a verified token) if its session has not been revoked."""
        if await self.revocations.is_revoked(
            principal.session_id, principal.user_id, principal.issued_at
        ):
            raise InvalidToken("This session has been signed out")
        return principal

    def principal_of(self, token: str) -> Principal:
        """The caller a *signed, unexpired* token names (revocation not checked). Memoised
        per token, like the signature check: a client repeats one token for 15 minutes."""
        claims = self.codec.verify(token)  # memoised too, and re-checks expiry every time
        principal = self._principals.get(token)
        if principal is not None:
            return principal
        try:
            principal = Principal(
                user_id=uuid.UUID(claims["sub"]),
                session_id=uuid.UUID(str(claims["sid"])),
                role=str(claims.get("role", "user")),
                mfa=claims.get("mfa") is True,
                issued_at=float(claims["iat"]),
            )
        except (KeyError, ValueError, TypeError) as error:
            raise InvalidToken() from error
        self._principals[token] = principal
        if len(self._principals) > self.codec.memo_size:
            self._principals.popitem(last=False)
        return principal

    # ---- sessions -----------------------------------------------------------------------
    async def logout(self, principal: Principal, *, everywhere: bool = False) -> None:
        """End this session (or every session of the user) at once."""
        now = _now()
        async with self.db.session() as session:
            if everywhere:
                # The user's row first: a login in flight (it holds the same lock) either
                # finishes before, and its session is among the live ones revoked here, or
                # starts after, and is a new sign-in that must work.
                user = await repository.user_by_id(session, principal.user_id, for_update=True)
                assert user is not None
                live = await repository.live_sessions(session, principal.user_id, now=now)
                ids = [s.id for s in live] + [principal.session_id]
                revoked = await repository.revoke_sessions(
                    session, ids, now=now, reason="logout_all"
                )
                # Access tokens carry whole-second `iat`: tokens of this very second are
                # covered by their sessions' revocation above, so the cut-off is the second
                # itself — a sign-in right after this one, in the same second, is valid.
                now = now.replace(microsecond=0)
                user.tokens_valid_after = now
            else:
                revoked = await repository.revoke_sessions(
                    session, [principal.session_id], now=now, reason="logout"
                )
        await self.revocations.publish(
            {*revoked, principal.session_id}, (principal.user_id, now) if everywhere else None
        )
        log.info("identity.logout", user_id=str(principal.user_id), everywhere=everywhere)

    async def revoke_session(self, principal: Principal, session_id: uuid.UUID) -> None:
        """Sign out one of the caller's own devices."""
        async with self.db.session() as session:
            auth = await session.get(AuthSession, session_id)
            if auth is None or auth.user_id != principal.user_id:
                raise NotFound("Session not found")
            await repository.revoke_sessions(session, [session_id], now=_now(), reason="revoked")
        await self.revocations.publish([session_id])

    # ---- MFA ----------------------------------------------------------------------------
    async def mfa_setup(self, session: AsyncSession, principal: Principal) -> MfaEnrollment:
        """Start (or restart) enrolment: a new secret and backup codes, active after verify."""
        user = await repository.user_by_id(session, principal.user_id, for_update=True)
        assert user is not None
        if user.mfa_enabled:
            raise Conflict("MFA is already enabled")
        secret = self.totp.new_secret()
        codes = self.backup_codes.generate()
        user.mfa_secret = secret
        user.mfa_backup_codes = [self.backup_codes.digest(c) for c in codes]
        user.mfa_last_step = None
        return MfaEnrollment(
            secret=secret,
            provisioning_uri=self.totp.provisioning_uri(secret, user.email),
            backup_codes=codes,
        )

    async def mfa_verify(self, principal: Principal, code: str) -> str:
        """Check a TOTP (or backup) code: enables MFA on first success, marks this session
        as MFA-verified, returns a new access token that says so."""
        async with self.db.session() as session:
            user = await repository.user_by_id(session, principal.user_id, for_update=True)
            assert user is not None
            if user.mfa_secret is None:
                raise Conflict("Start MFA enrolment first")
            if not await self._second_factor(session, user, code, allow_backup=user.mfa_enabled):
                raise InvalidCredentials("Wrong or already used one-time code")
            user.mfa_enabled = True
            auth = await session.get(AuthSession, principal.session_id)
            if auth is None or auth.revoked_at is not None:
                raise InvalidToken("This session has been signed out")
            auth.mfa_verified = True
            role = user.role
        log.info("identity.mfa.verified", user_id=str(principal.user_id))
        return self._access_token(principal.user_id, principal.session_id, role, True)

    async def _second_factor(
        self, session: AsyncSession, user: User, code: str, *, allow_backup: bool = True
    ) -> bool:
        assert user.mfa_secret is not None
        step = self.totp.verify(user.mfa_secret, code, last_step=user.mfa_last_step)
        if step is not None:
            return await repository.consume_totp_step(session, user.id, step)
        if allow_backup:
            digest = self.backup_codes.match(code, list(user.mfa_backup_codes))
            if digest is not None:
                log.info("identity.mfa.backup_code_used", user_id=str(user.id))
                return await repository.consume_backup_code(session, user.id, digest)
        return False

    # ---- plans and privileges -----------------------------------------------------------
    async def change_plan(
        self,
        session: AsyncSession,
        actor_id: uuid.UUID | None,
        *,
        user_id: uuid.UUID,
        plan: str,
        expires_at: datetime | None,
        request_id: str | None = None,
    ) -> None:
        """Set a user's plan, audited; every cache forgets the user once this commits."""
        if plan not in self.catalog:
            raise UnknownPlan(f"Unknown plan {plan!r}", extra={"plans": sorted(self.catalog.plans)})
        if await repository.user_by_id(session, user_id) is None:
            raise NotFound("User not found")
        current = await repository.subscription_for_update(session, user_id)
        before = (
            {"plan": current.plan, "expires_at": _iso(current.expires_at)}
            if current is not None
            else {"plan": "free", "expires_at": None}
        )
        await repository.upsert_subscription(session, user_id, plan=plan, expires_at=expires_at)
        await audit(
            session,
            actor_id,
            action="identity.plan.changed",
            subject_type="user",
            subject_id=str(user_id),
            before=before,
            after={"plan": plan, "expires_at": _iso(expires_at)},
            request_id=request_id,
        )

        self.privileges.invalidate_on_commit(session, user_id)
        log.info("identity.plan.changed", user_id=str(user_id), plan=plan)

    async def active_users(self, session: AsyncSession, *, within: timedelta) -> int:
        """Users who used a session within ``within`` (admin metrics)."""
        return await repository.active_user_count(session, datetime.now(UTC) - within)

    async def clear_privilege_cache(self) -> None:
        """Forget every cached privilege in every process (O(1): a namespace bump)."""
        await self.privileges.cache.clear()

    async def privileges_of(self, user_id: uuid.UUID) -> Privileges:
        return await self.privileges.get(user_id)

    async def has_privilege(self, user_id: uuid.UUID, feature: str) -> bool:
        return await self.privileges.has_privilege(user_id, feature)

    async def rate_tier(self, user_id: uuid.UUID) -> str:
        """The caller's rate-limit tier (plan → ``IDENTITY_PLAN_RATE_TIERS``)."""
        return (await self.privileges.get(user_id)).rate_tier

    def rate_limit_subject(self, scope: Any) -> Subject | Awaitable[Subject | None] | None:
        """kit.ratelimit's ``identify`` hook: the caller's user id and plan tier, so the
        plan selects the policy (seed 004: 300/500/1 000 per 15 min). The token is fully
        authenticated here (signature, expiry, revocation); an invalid or signed-out token
        is anonymous: it spends the client IP's budget. The privileges it
        loads are left in the request state for the route to reuse."""
        token = _bearer(scope)
        if token is None:
            return None
        try:
            principal = self.principal_of(token)
        except InvalidToken:
            return None
        # The common case answers from memory without a coroutine: a trusted revocation
        # list and the caller's privileges already built (ADR 0006, bench/privileges.py).
        revoked = self.revocations.revoked_now(
            principal.session_id, principal.user_id, principal.issued_at
        )
        if revoked is not None:
            if revoked:
                return None  # a signed-out token buys no user tier: anonymous, per IP
            privileges = self.privileges.peek(principal.user_id)
            if privileges is not None:
                return _admit(scope, principal, privileges)
        return self._subject(principal, scope)

    async def _subject(self, principal: Principal, scope: Any) -> Subject | None:
        try:
            if await self.revocations.is_revoked(
                principal.session_id, principal.user_id, principal.issued_at
            ):
                return None  # a signed-out token buys no user tier: anonymous, per IP
        except DependencyUnavailable:
            return None  # cannot tell: anonymous here; the route's own check answers 503
        return _admit(scope, principal, await self.privileges.get(principal.user_id))


def _admit(scope: Any, principal: Principal, privileges: Privileges) -> Subject:
    """The limiter's subject for a live principal; both are left in the request state for
    the route (``current_user`` and ``/me/privileges`` reuse them)."""
    state = scope.setdefault("state", {})
    state[PRIVILEGES_STATE] = privileges
    state[PRINCIPAL_STATE] = principal
    return Subject(principal.key, privileges.rate_tier)


def _bearer(scope: Any) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return str(token.strip())
            return None
    return None


async def audit(
    session: AsyncSession,
    actor_id: uuid.UUID | None,
    *,
    action: str,
    subject_type: str,
    subject_id: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> None:
    """Append to the audit log in the caller's unit of work (other domains call this)."""
    await repository.add_audit(
        session,
        actor_id,
        action=action,
        subject_type=subject_type,
        subject_id=subject_id,
        before=before,
        after=after,
        request_id=request_id,
    )


async def refresh_active_subscriptions(db: Database, *, min_age: float = 0.0) -> bool:
    """Refresh the view in a unit of work of its own (see ``refresh_view``)."""
    async with db.session() as session:
        return await refresh_view(session, min_age=min_age)


async def refresh_view(session: AsyncSession, *, min_age: float = 0.0) -> bool:
    """``REFRESH MATERIALIZED VIEW CONCURRENTLY active_subscriptions`` (seed 003), at most one
    at a time across processes (transaction-scoped advisory lock) and not more often than
    ``min_age`` seconds. Readers are not blocked (CONCURRENTLY); the refresh time is recorded
    for the read path's overlay. Returns whether it refreshed."""
    got = await session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": REFRESH_LOCK_ID})
    if not got:
        return False
    if min_age > 0:
        fresh = await session.scalar(
            text(
                "SELECT refreshed_at > now() - make_interval(secs => :age) "
                "FROM view_refreshes WHERE name = 'active_subscriptions'"
            ),
            {"age": min_age},
        )
        if fresh:
            return False
    started = time.perf_counter()
    await session.execute(text("REFRESH MATERIALIZED VIEW CONCURRENTLY active_subscriptions"))
    # now() is the transaction start, before the refresh's snapshot: conservative.
    await session.execute(
        text(
            "INSERT INTO view_refreshes (name, refreshed_at) "
            "VALUES ('active_subscriptions', now()) "
            "ON CONFLICT (name) DO UPDATE SET refreshed_at = excluded.refreshed_at"
        )
    )
    log.info(
        "identity.view_refreshed",
        view="active_subscriptions",
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
    )
    return True


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
