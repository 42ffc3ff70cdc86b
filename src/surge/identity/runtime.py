"""Identity's per-process state, kept on the ``Runtime`` behind typed accessors.

The identity *service* is stateless (``surge.identity.service.identity``); what one process
must keep between requests lives here: the token codec and its verification memo, the
password hasher, the privilege store (its L1 cache and invalidation listener), the
revocation list (its pub/sub listener), the login guard, the device-token codec and the
client-IP resolver.

    state = identity_state(runtime)          # the whole bundle
    store = privilege_store(runtime)         # or one piece, typed

``install_identity(runtime)`` builds it once per process (``create_app``, the demo seeding,
tests); ``Runtime.stop()`` closes it like every extension.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict

import structlog

from surge.config import Settings
from surge.identity.devices import DeviceTokens
from surge.identity.free_users import FreeUsers
from surge.identity.plans import Catalog
from surge.identity.principal import Principal
from surge.identity.privileges import PrivilegeStore
from surge.identity.security import LoginGuard, RevocationList
from surge.identity.users import UserStore
from surge.kit.cache import Cache
from surge.kit.db.phase import expected_slow
from surge.kit.runtime import Runtime
from surge.kit.security import BackupCodes, InvalidToken, KeyRing, PasswordHasher, TokenCodec, Totp
from surge.kit.web.client_ip import ClientIpResolver

log = structlog.get_logger()

EXTENSION = "identity"
#: Seconds between checks of the free users' snapshot (a rebuild only when it is due).
_SNAPSHOT_CHECK = 5.0
#: Seconds the start-up warming waits for the invalidation channel before giving up on it.
_LISTEN_WAIT = 10.0


def key_ring(settings: Settings) -> KeyRing:
    spec = settings.AUTH_SIGNING_KEYS.get_secret_value()
    if spec:
        return KeyRing.parse(spec)
    return KeyRing.derived(settings.SECRET_KEY.get_secret_value())


def _cache(
    runtime: Runtime, name: str, namespace: str, *, l1_max_entries: int, ttl: float
) -> Cache:
    """One of identity's read caches (privileges, ``/me`` views): the same memory TTL,
    staleness bound and cache settings, each its own name, keys, size and Redis TTL."""
    settings = runtime.settings
    return Cache(
        runtime.redis,
        name=name,
        namespace=namespace,
        l1_max_entries=l1_max_entries,
        l1_ttl=settings.IDENTITY_PRIVILEGE_L1_TTL.total_seconds(),
        ttl=ttl,
        max_stale=settings.IDENTITY_PRIVILEGE_STALE.total_seconds(),
        early_refresh=settings.CACHE_EARLY_REFRESH,
        resync_interval=settings.CACHE_RESYNC_INTERVAL.total_seconds(),
        lease=settings.CACHE_LEASE.total_seconds(),
    )


class IdentityState:
    """What one process keeps for identity (see the module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.runtime = runtime
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
        privilege_cache = _cache(
            runtime,
            "privileges",
            "surge:identity:priv",
            l1_max_entries=settings.IDENTITY_PRIVILEGE_L1_SIZE,
            ttl=settings.IDENTITY_PRIVILEGE_TTL.total_seconds(),
        )
        self.privileges = PrivilegeStore(
            runtime.db,
            privilege_cache,
            self.catalog,
            # The snapshot's safety net is the Redis TTL's: a write that bypassed the
            # service (and its invalidation) is seen within it.
            free_users=FreeUsers(
                privilege_cache, max_age=settings.IDENTITY_PRIVILEGE_TTL.total_seconds()
            )
            if settings.IDENTITY_FREE_SNAPSHOT
            else None,
        )
        # GET /me without a pooled connection when warm (issue 19, ADR 0016).
        self.users = UserStore(
            runtime.db,
            _cache(
                runtime,
                "users",
                "surge:identity:user",
                l1_max_entries=settings.IDENTITY_USER_L1_SIZE,
                ttl=settings.IDENTITY_USER_TTL.total_seconds(),
            ),
        )
        self.revocations = RevocationList(
            runtime.db, runtime.redis, access_ttl=settings.AUTH_ACCESS_TTL.total_seconds()
        )
        self.login_guard = LoginGuard(
            runtime.redis,
            window=settings.AUTH_LOGIN_WINDOW.total_seconds(),
            max_per_account=settings.AUTH_LOGIN_MAX_FAILURES_ACCOUNT,
            max_per_ip=settings.AUTH_LOGIN_MAX_FAILURES_IP,
            max_per_device=settings.AUTH_LOGIN_MAX_FAILURES_DEVICE,
        )
        self.devices = DeviceTokens(settings)
        self.client_ip = ClientIpResolver(settings.TRUSTED_PROXIES)
        self._principals: OrderedDict[str, Principal] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self, *, warm: bool = True, refresh_view: bool = True) -> None:
        """Subscribe to invalidations, warm the privilege cache, start the view refresher."""
        await self.revocations.start()
        await self.privileges.start()
        await self.users.start()
        if warm:
            # Bulk reads before the process takes traffic: expected to be slow on a busy
            # machine, not the slow-query alert's business (kit.db.phase, ADR 0054).
            with expected_slow("startup.identity_warm"):
                await self._warm()
        if refresh_view:
            self._tasks.append(
                asyncio.create_task(self._refresh_forever(), name="identity-view-refresh")
            )
        if self.privileges.free_users is not None:
            self._tasks.append(
                asyncio.create_task(self._snapshot_forever(), name="identity-free-users")
            )

    async def _warm(self) -> None:
        """Before the process takes traffic (ADR 0050): the free users' snapshot, every
        subscribed user's privileges into Redis, then the most active users' privileges and
        ``/me`` views into memory (last, so the memory tier keeps them). A cold cache is
        slower, not broken: a step that fails is logged and the next one still runs."""
        settings = self.settings
        store = self.privileges

        async def snapshot() -> None:
            # The snapshot needs the invalidation channel heard from before it starts.
            await asyncio.wait_for(store.cache.wait_listening(), _LISTEN_WAIT)
            await store.refresh_free_users()

        async def subscribed() -> None:
            log.info("identity.privileges.subscribed_warmed", loaded=await store.warm_subscribed())

        async def active() -> None:
            warmed = await store.warm(settings.IDENTITY_WARM_USERS)
            log.info("identity.privileges.warmed", users=warmed)
            loaded = await self.users.warm(settings.IDENTITY_WARM_USERS)
            log.info("identity.users.warmed", loaded=loaded)

        steps = {
            "free_users": snapshot if store.free_users is not None else None,
            "subscribed": subscribed if settings.IDENTITY_WARM_SUBSCRIBED else None,
            "active": active if settings.IDENTITY_WARM_USERS > 0 else None,
        }
        for name, step in steps.items():
            if step is None:
                continue
            try:
                await step()
            except Exception as error:
                log.warning("identity.warm_failed", step=name, error=str(error)[:200])

    async def _snapshot_forever(self) -> None:
        """Retake the free users' snapshot when it stops being trusted (an invalidation
        possibly missed: a Redis outage, a gap), gets too dirty or too old."""
        while True:
            await asyncio.sleep(_SNAPSHOT_CHECK)
            try:
                await self.privileges.refresh_free_users()
            except Exception as error:  # until then the cache tiers answer everyone
                log.warning("identity.free_users.rebuild_failed", error=str(error)[:200])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.privileges.close()
        await self.users.close()
        await self.revocations.close()

    async def _refresh_forever(self) -> None:
        # The worker fleet runs this as the periodic job ``identity.active_subscriptions.refresh``
        # (surge.identity.jobs). Web processes keep this loop too, so a deployment without
        # workers (``surge serve`` alone) still refreshes; the advisory lock and the
        # "refreshed recently" check keep the cluster at one refresh per interval.
        from surge.identity.service import identity as identity_service

        interval = self.settings.IDENTITY_REFRESH_INTERVAL.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                async with self.runtime.db.session() as session:
                    await identity_service.refresh_view(session, min_age=interval * 0.9)
            except Exception as error:
                log.warning("identity.view_refresh_failed", error=str(error)[:200])

    # ---- tokens -------------------------------------------------------------------------
    def access_token(self, user_id: uuid.UUID, session_id: uuid.UUID, role: str, mfa: bool) -> str:
        return self.codec.issue(
            str(user_id),
            {
                "sid": str(session_id),
                "role": role,
                "mfa": mfa,
                "amr": ["pwd", "otp"] if mfa else ["pwd"],
            },
        )

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

    async def check_live(self, principal: Principal) -> Principal:
        """``principal`` (from a verified token) if its session has not been revoked."""
        if await self.revocations.is_revoked(
            principal.session_id, principal.user_id, principal.issued_at
        ):
            raise InvalidToken("This session has been signed out")
        return principal

    async def authenticate(self, token: str) -> Principal:
        """Verify an access token and that its session is still live."""
        return await self.check_live(self.principal_of(token))


def install_identity(runtime: Runtime) -> IdentityState:
    """Build this process's identity state once and keep it on ``runtime``."""
    existing = runtime.extensions.get(EXTENSION)
    if isinstance(existing, IdentityState):
        return existing
    state = IdentityState(runtime)
    runtime.extensions[EXTENSION] = state
    return state


def identity_state(runtime: Runtime) -> IdentityState:
    """This process's identity state (``install_identity`` must have run)."""
    state = runtime.extensions[EXTENSION]
    assert isinstance(state, IdentityState)
    return state


def privilege_store(runtime: Runtime) -> PrivilegeStore:
    return identity_state(runtime).privileges


def user_store(runtime: Runtime) -> UserStore:
    return identity_state(runtime).users


def revocation_list(runtime: Runtime) -> RevocationList:
    return identity_state(runtime).revocations


def login_guard(runtime: Runtime) -> LoginGuard:
    return identity_state(runtime).login_guard


def token_codec(runtime: Runtime) -> TokenCodec:
    return identity_state(runtime).codec
