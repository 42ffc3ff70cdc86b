"""The cache's state and the plumbing every part uses: the guarded L2 client, script
registration, degradation bookkeeping and metric flushing."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import random
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import structlog
from redis.asyncio.client import Redis
from redis.exceptions import ReadOnlyError, RedisError

from surge.kit.cache import metrics as m
from surge.kit.cache._l1 import LRU, Slots
from surge.kit.pubsub import ChannelListener
from surge.kit.redis import CONNECTION_ERRORS, RedisGateway, RedisUnavailable

log = structlog.get_logger()


def refresh_early(fresh_until: float, now: float, window: float) -> bool:
    """Probabilistic early refresh: inside the last ``window`` seconds of an entry's
    freshness, True with a probability rising linearly from 0 to 1 at expiry. Hot entries
    are refreshed before they expire (one background load per process: single-flight; one
    across processes: the lease), so readers never see the expiry, and entries written
    together spread their refreshes over the window instead of reloading as a wave."""
    left = fresh_until - now
    return window > 0 and left < window and random.random() * window > left


T = TypeVar("T")
Loader = Callable[[], Awaitable[T]]
BatchLoader = Callable[[Sequence[str]], Awaitable[Mapping[str, T]]]
Source = Literal["l1", "l2", "loader"]

_FORMAT = 1
_NEEDS_TAGS: Any = object()
_REDIS_DOWN: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, ReadOnlyError)
_MISSING: Any = object()
#: Tag version keys outlive every entry that can carry them (TTL + max stale ≪ 1 day); a tag
#: key that expired restarts at 1, which no living entry can carry.
_TAG_KEY_TTL_MS = 24 * 3600 * 1000
#: More distinct tags than this in one process's table: flush L1 and start over (bounds memory).
_MAX_TAGS = 200_000
#: While Redis is down, invalidations are queued and replayed on recovery; past this many the
#: replay becomes one ``clear()`` (the namespace bump is O(1) whatever was missed).
_MAX_PENDING = 10_000

# Keys of the loads running in this task's call chain: a loader that asks for its own key
# would wait on itself forever (cachebox#54); we raise instead.
_loading: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "surge_cache_loading", default=frozenset()
)


class CacheError(Exception):
    """Root of the errors the cache itself raises (a loader's own errors pass through as is)."""


class RecursiveLoad(CacheError):
    """A loader asked for the key it is loading: that would wait on itself forever."""


class ValueNotCacheable(CacheError, TypeError):
    """The value is not a msgpack type (a model object, a datetime...): convert it first."""


class CacheResult(NamedTuple, Generic[T]):
    """A value and where it came from. ``stale`` is True when it is past its TTL: served
    while a refresh runs (stale-while-revalidate) or because the loader failed
    (stale-if-error). A NamedTuple: built on every hit, it must be cheap (a frozen
    dataclass costs three ``object.__setattr__`` calls)."""

    value: T
    stale: bool
    source: Source


class _CacheBase:
    """Everything the parts of ``Cache`` share: the constructor and its state, the guarded L2
    client, the degraded-mode bookkeeping. ``Cache`` (``core.py``) documents the parameters."""

    def __init__(
        self,
        gateway: RedisGateway,
        *,
        name: str = "default",
        namespace: str = "surge:cache",
        l1_max_entries: int = 50_000,
        l1_ttl: float = 60.0,
        ttl: float = 300.0,
        ttl_jitter: float = 0.1,
        early_refresh: float = 0.1,
        stale_while_revalidate: float = 30.0,
        max_stale: float = 3600.0,
        fail_safe_throttle: float = 5.0,
        lease: float = 2.0,
        max_value_bytes: int = 1024 * 1024,
        resync_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway = gateway
        self.name = name
        self.namespace = namespace
        self.l1 = LRU(l1_max_entries)
        self.l1_ttl = l1_ttl
        self.ttl = ttl
        self.ttl_jitter = ttl_jitter
        #: The last fraction of an entry's TTL in which a hit may start a background
        #: refresh (``refresh_early``; 0 turns it off).
        self.early_refresh = max(0.0, early_refresh)
        self.stale_while_revalidate = stale_while_revalidate
        self.max_stale = max_stale
        self.fail_safe_throttle = fail_safe_throttle
        self.lease = lease
        self.max_value_bytes = max_value_bytes
        self.resync_interval = resync_interval
        self.clock = clock
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

        self._channel = f"{namespace}:inv"
        self._seq_key = f"{namespace}:seq"
        self._ver_key = f"{namespace}:ver"
        self._ver = 0
        self._prefix = f"{namespace}:0:"
        #: Tag → last version known here (versions only grow; a gap or reconnect resyncs).
        self._tags: dict[str, int] = {}
        #: Bumped when L1 is flushed wholesale (gap, reconnect, clear, outage tag drop): a
        #: read or load that saw it move does not fill L1 (its value may predate the flush).
        self._epoch = 0
        self._watched: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._flights: dict[str, asyncio.Task[CacheResult[Any]]] = {}
        self._reads: dict[str, asyncio.Future[CacheResult[Any]]] = {}
        self._refreshing: set[asyncio.Task[Any]] = set()
        self._pending_keys: set[str] = set()
        self._pending_tags: set[str] = set()
        self._pending_clear = False
        self._last_seq = 0
        self._seen_remote = 0
        #: The invalidation channel's listener (``surge.kit.pubsub``), made at ``start()``.
        self._listener: ChannelListener | None = None
        #: Called with every key this process drops as invalidated (``Cache.on_drop``).
        self._drop_listeners: list[Callable[[str], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self._scripts: dict[str, Any] = {}
        pool_size = gateway.raw.connection_pool.max_connections
        # Half the pool: the rest stays for the listener and the other Redis users. (Past the
        # pool size, callers would wait up to the socket timeout for a connection and then
        # get an error: the cache queues its own commands first.)
        self._l2_slots = Slots(max(1, min(pool_size, 2**31) // 2))
        # Hot-path counters, flushed to prometheus about once a second.
        self._hits_l1 = self._miss_l1 = self._hits_l2 = self._miss_l2 = 0
        self._flushed = (0, 0, 0, 0, 0)
        self._degraded = not gateway.is_up
        self._next_error_log = 0.0
        self._next_defer_log = 0.0
        gateway.on_change(self._on_redis_change)
        self._children = {
            "hit_l1": m.HITS.labels(name, "l1"),
            "hit_l2": m.HITS.labels(name, "l2"),
            "miss_l1": m.MISSES.labels(name, "l1"),
            "miss_l2": m.MISSES.labels(name, "l2"),
        }

    # ==== L2 ================================================================================
    @property
    def _listening(self) -> bool:
        """Subscribed to the invalidation channel, baseline taken."""
        return self._listener is not None and self._listener.listening

    async def wait_listening(self) -> None:
        """Return once subscribed to invalidations with the baseline taken (a readiness
        event: a test waits on it instead of polling); ``start()`` first."""
        assert self._listener is not None, "start() first"
        await self._listener.wait_listening()

    def _on_redis_change(self, up: bool) -> None:
        """The gateway saw Redis go down or come back (``_Coherence`` implements it)."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def _redis(self) -> AsyncIterator[Redis]:
        """The gateway's guarded client, at most ``_l2_slots`` commands at once: a burst of
        misses on distinct keys queues here (cheaply, in order) instead of draining the
        process's Redis pool that the rate limiter, the job queue... share."""
        if not self._l2_slots.try_take():
            await self._l2_slots.take()
        try:
            async with self.gateway.guard() as client:
                yield client
        except RedisError as exc:
            # Redis answered, but with an error (OOM under maxmemory, WRONGTYPE, a script
            # error): L2 is unusable for this call; the caller degrades like for an outage.
            self._l2_error(exc)
            raise RedisUnavailable(f"cache L2 error: {exc}") from exc
        finally:
            self._l2_slots.give()

    async def _gateway_verdict(self, exc: BaseException) -> None:
        """Let the gateway judge a connection-level error from the lean path (an outage
        marks it down; an exhausted pool does not), exactly as ``guard()`` would."""
        try:
            async with self.gateway.guard():
                raise exc
        except RedisUnavailable:
            self._note_degraded()

    def _lease_key(self, key: str) -> str:
        return f"{self.namespace}:lease:{self._ver}:{key}"

    def _script(self, client: Any, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = client.register_script(source)
        return script

    def _l2_error(self, exc: BaseException) -> None:
        """A Redis error reply: counted always, logged at most every 10 s (no log storm)."""
        now = time.monotonic()
        if now >= self._next_error_log:
            self._next_error_log = now + 10.0
            log.warning("cache.l2_error", cache=self.name, error=f"{type(exc).__name__}: {exc}")

    def _note_degraded(self) -> None:
        """One log line per outage; L2 errors are counted, callers see none."""
        m.L2_ERRORS.labels(self.name).inc()
        if not self.gateway.is_up and not self._degraded:
            self._degraded = True
            m.DEGRADED.labels(self.name).set(1)
            log.warning("cache.degraded", cache=self.name, serving="l1+loader")

    def _flush_metrics(self) -> None:
        current = (self._hits_l1, self._miss_l1, self._hits_l2, self._miss_l2, self.l1.evictions)
        before = self._flushed
        c = self._children
        for child, now_v, was in zip(
            (c["hit_l1"], c["miss_l1"], c["hit_l2"], c["miss_l2"]), current, before, strict=False
        ):
            if now_v > was:
                child.inc(now_v - was)
        if current[4] > before[4]:
            m.EVICTIONS.labels(self.name).inc(current[4] - before[4])
        self._flushed = current
        m.L1_ENTRIES.labels(self.name).set(len(self.l1))
        lookups = self._hits_l1 + self._miss_l1
        if lookups:
            m.HIT_RATIO.labels(self.name).set((self._hits_l1 + self._hits_l2) / lookups)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
