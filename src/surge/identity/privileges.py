"""Seed 003's privilege checks: process memory (LRU, 50 000) → Redis (5 min) → PostgreSQL.

The tiers, single-flight, stale-if-error and cross-process invalidation are ``kit.cache``'s;
identity owns a dedicated ``Cache`` instance (namespace ``surge:identity:priv``) so that the
50 000 memory slots seed 003 sizes are privileges only, never evicted by other caches.

Failover:
- Redis down → memory, then the database (the gateway knows Redis is down: no timeouts);
- PostgreSQL down, slow, or its pool exhausted (no connection within ``DB_POOL_TIMEOUT``)
  → the cached entry even past its TTL (``source="stale"``, up to
  ``IDENTITY_PRIVILEGE_STALE``);
- nothing cached and no answer from PostgreSQL → ``PrivilegesUnavailable`` (503 with
  ``Retry-After``). Seed 003 said "the free tier" here; under load that silently answered
  paying users as free with a 200 (issue 19: over 400 in one cold start, all from pool
  waits, not outages). A paying user is never downgraded by a failure: they get their
  last known plan or a 503 their client retries (ADR 0015).

Free users without a lookup: ``FreeUsers`` (``identity.free_users``, ADR 0050) is this
process's compact snapshot of the users who never had a subscription; its answers are
"free" from memory (counted under ``memory``, and apart in
``surge_privilege_snapshot_answers_total``), kept as coherent as the memory tier by the same
invalidations. At start (``IdentityState``) it is taken and every other user's privileges
are written to Redis in bulk (``warm_subscribed``), so a cold start of the web processes, or of Redis too, begins with every
population user answerable without PostgreSQL.

Invalidation: a plan change deletes the user's entry after its transaction commits — this
process's memory, Redis, and every other process's memory through kit.cache's pub/sub.
Caches hold only *which plan until when*; features come from configuration at read time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from surge.identity import repository
from surge.identity.free_users import FreeUsers
from surge.identity.plans import FREE, Catalog, Grant, Privileges, privileges_for
from surge.kit.cache import Cache
from surge.kit.db import Database, is_pool_exhausted, is_unavailable
from surge.kit.errors import DependencyUnavailable
from surge.kit.telemetry.metrics import BatchedCounter

log = structlog.get_logger()

PRIVILEGE_LOOKUPS = Counter(
    "surge_privilege_lookups_total",
    "Privilege lookups by the tier that answered (memory, redis, database, stale), or "
    "unavailable (nothing cached, no database answer: a 503).",
    ["source"],
)
PRIVILEGE_BATCH_LOOKUPS = Counter(
    "surge_privilege_batch_lookups_total",
    "The part of surge_privilege_lookups_total made by batch checks (a service caller asking "
    "about other users, often ones nobody has asked about for a while), by the same tiers. "
    "The rest are users' own checks; the two hit ratios differ by nature (ADR 0041).",
    ["source"],
)
_SOURCES = {"l1": "memory", "l2": "redis", "loader": "database"}
_TIERS = ("memory", "redis", "database", "stale", "unavailable")
_BATCHED = BatchedCounter(PRIVILEGE_LOOKUPS)  # one lookup per authenticated request
_COUNTERS = {s: _BATCHED.labels(s) for s in _TIERS}
_BATCH_COUNTERS = {s: BatchedCounter(PRIVILEGE_BATCH_LOOKUPS).labels(s) for s in _TIERS}
PRIVILEGE_SNAPSHOT_ANSWERS = Counter(
    "surge_privilege_snapshot_answers_total",
    "The part of the memory answers of surge_privilege_lookups_total given by the free users' "
    "snapshot (users without any subscription: free, no per-user entry; ADR 0050), by kind "
    "(own check or batch).",
    ["kind"],
)
_SNAPSHOT_BATCHED = BatchedCounter(PRIVILEGE_SNAPSHOT_ANSWERS)
_SNAPSHOT_OWN = _SNAPSHOT_BATCHED.labels("own")
_SNAPSHOT_BATCH = _SNAPSHOT_BATCHED.labels("batch")
#: The "cached value" of a memo built from the free users' snapshot (no cache entry).
_SNAPSHOT: Any = object()
_FREE_GRANT = {"p": FREE, "e": None, "f": True}


class PrivilegesUnavailable(DependencyUnavailable):
    """Nothing cached for the user and PostgreSQL did not answer (down, or its pool busy):
    503 with ``Retry-After`` — never the free tier in their place."""


class PrivilegeStore:
    """Privileges of users, through ``cache`` (memory → Redis) and the database."""

    def __init__(
        self,
        db: Database,
        cache: Cache,
        catalog: Catalog,
        *,
        clock: Callable[[], float] = time.time,
        free_users: FreeUsers | None = None,
    ) -> None:
        self.db = db
        self.cache = cache
        self.catalog = catalog
        #: The snapshot of users without a subscription (None: every lookup goes to the cache).
        self.free_users = free_users
        #: Wall-clock seconds against which plans expire (tests move it, as tokens' clock).
        self.clock = clock
        #: user id → (cached value, source, valid until (epoch s), its Privileges, cache
        #: key): a memory hit returns the same Privileges until the cache entry is replaced
        #: or the plan expires, instead of decoding the entry and building a new one.
        self._built: dict[uuid.UUID, tuple[object, str, float, Privileges, str]] = {}
        self._built_max = max(1, cache.l1.max_entries)

    async def start(self) -> None:
        await self.cache.start()

    async def close(self) -> None:
        await self.cache.close()

    # ---- reads --------------------------------------------------------------------------
    def peek(self, user_id: uuid.UUID) -> Privileges | None:
        """``get`` without I/O and without a coroutine: the Privileges if this process holds
        the user's entry fresh in memory and has already built it, else None (then ``get``).
        The rate-limit hook calls it on every authenticated request."""
        built = self._built.get(user_id)
        if built is None or built[1] != "memory" or self.clock() >= built[2]:
            return None
        if built[0] is _SNAPSHOT:
            if self.free_users is None or not self.free_users.is_free(user_id, built[4]):
                return None
            _SNAPSHOT_OWN.inc()
        elif self.cache.peek(built[4]) is not built[0]:
            return None
        _COUNTERS["memory"].inc()
        return built[3]

    async def get(self, user_id: uuid.UUID) -> Privileges:
        key = str(user_id)
        if self.free_users is not None and self.free_users.is_free(user_id, key):
            _SNAPSHOT_OWN.inc()
            return self._answer(user_id, key, _SNAPSHOT, False, "l1")

        async def load() -> dict[str, Any]:
            async with self.db.read_session() as session:
                grants = await repository.grants(session, [user_id])
            return _encode(grants[user_id])

        try:
            result = await self.cache.fetch(key, load)
        except Exception as error:
            if not is_unavailable(error):
                raise
            raise self._unavailable(error, users=1) from error
        return self._answer(user_id, key, result.value, result.stale, result.source)

    def _answer(
        self,
        user_id: uuid.UUID,
        key: str,
        value: dict[str, Any],
        stale: bool,
        tier: str,
        *,
        batch: bool = False,
    ) -> Privileges:
        """The Privileges for a cache answer, counted once under the tier that gave it (and
        among batch lookups too when ``batch``); built once per cache entry (a memory hit
        returns the Privileges built before)."""
        source = "stale" if stale else _SOURCES.get(tier, tier)
        _COUNTERS[source].inc()
        if batch:
            _BATCH_COUNTERS[source].inc()
        built = self._built.get(user_id)
        now = self.clock()
        if built is not None and built[0] is value and built[1] == source and now < built[2]:
            return built[3]
        grant = _decode(_FREE_GRANT if value is _SNAPSHOT else value)
        privileges = privileges_for(
            self.catalog, user_id, grant, source, datetime.fromtimestamp(now, UTC)
        )
        if len(self._built) >= self._built_max:
            self._built.pop(next(iter(self._built)))  # the oldest built
        valid_until = (
            grant.expires_at.timestamp()
            if grant.expires_at is not None and privileges.plan != FREE
            else float("inf")
        )
        self._built[user_id] = (value, source, valid_until, privileges, key)
        return privileges

    async def has_privilege(self, user_id: uuid.UUID, feature: str) -> bool:
        """Seed 003's check; from memory it costs microseconds (``bench/privileges.py``)."""
        return (await self.get(user_id)).has(feature)

    async def get_many(self, user_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Privileges]:
        """Privileges for each id, each lookup counted once by the tier that answered it.
        Misses cost one Redis MGET and one SQL query for all of them together
        (``Cache.fetch_many``), not one round trip — nor one coroutine — per user. Nothing
        cached for some user and no answer from PostgreSQL: ``PrivilegesUnavailable`` (503)."""
        unique = list(dict.fromkeys(user_ids))
        keys = [str(u) for u in unique]
        out: dict[uuid.UUID, Privileges] = {}
        if self.free_users is not None:
            free = self.free_users.free_among(unique, keys)
            if any(free):
                rest: list[uuid.UUID] = []
                for user_id, key, is_free in zip(unique, keys, free, strict=True):
                    if is_free:
                        out[user_id] = self._answer(
                            user_id, key, _SNAPSHOT, False, "l1", batch=True
                        )
                    else:
                        rest.append(user_id)
                _SNAPSHOT_BATCH.inc(len(out))
                unique = rest
                keys = [str(u) for u in unique]
                if not unique:
                    return out
        try:
            results = await self.cache.fetch_many(keys, self._load_many)
        except Exception as error:
            if not is_unavailable(error):
                raise  # a bug, not an outage
            raise self._unavailable(error, users=len(unique), batch=True) from error
        for user_id, key in zip(unique, keys, strict=True):
            result = results.get(key)
            if result is None:  # the loader left it out (never, with grants())
                out[user_id] = await self.get(user_id)
            else:
                out[user_id] = self._answer(
                    user_id, key, result.value, result.stale, result.source, batch=True
                )
        return out

    def _unavailable(
        self, error: BaseException, *, users: int, batch: bool = False
    ) -> PrivilegesUnavailable:
        busy = is_pool_exhausted(error)
        log.warning(
            "identity.privileges.unavailable",
            users=users,
            reason="pool_exhausted" if busy else "database_unavailable",
        )
        _COUNTERS["unavailable"].inc(users)
        if batch:
            _BATCH_COUNTERS["unavailable"].inc(users)
        return PrivilegesUnavailable(
            "Your plan cannot be read right now; retry shortly", retry_after=1 if busy else 5
        )

    async def _load_many(self, keys: Sequence[str]) -> dict[str, Any]:
        async with self.db.read_session() as session:
            grants = await repository.grants(session, keys)
        return {key: _encode(grant) for key, grant in grants.items()}

    # ---- writes -------------------------------------------------------------------------
    def invalidate_on_commit(self, session: AsyncSession, user_id: uuid.UUID) -> None:
        """Forget ``user_id`` everywhere once ``session`` commits (never on rollback)."""
        self.cache.invalidate_on_commit(session, keys=[str(user_id)])

    async def invalidate(self, user_id: uuid.UUID) -> None:
        await self.cache.delete(str(user_id))

    async def warm(self, limit: int) -> int:
        """Load the most active users' privileges into memory (and Redis) at start."""
        async with self.db.read_session() as session:
            user_ids = await repository.most_active_users(session, limit)
        await self.cache.warm([str(u) for u in user_ids], self._load_many)
        return len(user_ids)

    async def refresh_free_users(self) -> bool:
        """Take a new snapshot of the users without a subscription if the one held is not
        trusted, too old or too dirty (``FreeUsers.stale``). Returns whether it did."""
        if self.free_users is None or not self.free_users.stale():
            return False

        async def snapshot() -> bytes:
            # On the primary: a lagging replica could still show as free a user whose new
            # subscription committed, and whose invalidation was heard, before the build.
            async with self.db.session() as session:
                return await repository.free_user_ids(session)

        return await self.free_users.rebuild(snapshot)

    async def warm_subscribed(self) -> int:
        """Every user with a subscription (everyone the free snapshot leaves out) into Redis,
        in bulk: one query for the ids, then ``Cache.warm``'s chunks (one MGET, one SQL
        load for the missing, one Redis command to write them). Keys already in Redis (a
        restart of the web processes alone) cost the MGET only. Returns how many loaded."""
        async with self.db.read_session() as session:
            user_ids = await repository.subscribed_user_ids(session)
        return await self.cache.warm([str(u) for u in user_ids], self._load_many)

    def forget_all_local(self) -> None:
        """Drop this process's memory tier (tests, benchmarks)."""
        self.cache.l1.clear()


def _encode(grant: Grant) -> dict[str, Any]:
    return {
        "p": grant.plan,
        "e": grant.expires_at.isoformat() if grant.expires_at else None,
        "f": grant.found,
    }


def _decode(data: dict[str, Any]) -> Grant:
    expires = datetime.fromisoformat(data["e"]) if data.get("e") else None
    return Grant(plan=data["p"], expires_at=expires, found=bool(data.get("f", True)))
