"""``Cache``: L1 (process LRU) → L2 (Redis) → loader, coherent across processes.

See the package docstring for the public API and ``docs/adr/0005-tiered-cache.md`` for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import random
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import msgpack  # type: ignore[import-untyped]
import structlog
from redis.asyncio.client import PubSub, Redis
from redis.exceptions import ReadOnlyError, RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.cache import metrics as m
from surge.kit.cache._l1 import LRU, Entry, Slots
from surge.kit.db import on_commit
from surge.kit.redis import CONNECTION_ERRORS, RedisGateway, RedisUnavailable

log = structlog.get_logger()

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

# One round trip: write the value only if our lease survived (a delete kills the lease, so a
# load that raced an invalidation never writes the old value back — memcache leases).
_SET_IF_LEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""
# A miss asks, atomically: is the value there now? if not, may I load it? (A plain SET NX
# after the holder released its lease would hand out a second lease for a value that is
# already written.) Also returns the tag versions (KEYS[3..]) so the loader's result carries
# the versions read *before* it ran. ARGV[3] = '1': the value there is unusable, lease anyway.
_VALUE_OR_LEASE = """
local tags = {}
for i = 3, #KEYS do tags[#tags + 1] = redis.call('GET', KEYS[i]) end
if ARGV[3] ~= '1' then
  local v = redis.call('GET', KEYS[1])
  if v then return {1, v, tags} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, false, tags} end
return {0, false, tags}
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Invalidate and announce atomically: the sequence number and the message are one step, so a
# listener that sees seq N on the counter knows messages 1..N were all published before.
# KEYS: seq, version, then the targets; ARGV: channel, origin, kind, tag ttl, then the names.
_INVALIDATE = """
local seq = redis.call('INCR', KEYS[1])
local kind = ARGV[3]
local data = {}
if kind == 'k' then
  for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
  for i = 5, #ARGV do data[#data + 1] = ARGV[i] end
elseif kind == 't' then
  for i = 3, #KEYS do
    local v = redis.call('INCR', KEYS[i])
    redis.call('PEXPIRE', KEYS[i], ARGV[4])
    data[#data + 1] = ARGV[i + 2]
    data[#data + 1] = v
  end
elseif kind == 'c' then
  data[1] = redis.call('INCR', KEYS[2])
end
redis.call('PUBLISH', ARGV[1], cmsgpack.pack({seq, ARGV[2], kind, data}))
return {seq, data}
"""


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


class Cache:
    """A tiered cache: L1 process LRU → L2 Redis → loader. One per process (``runtime.cache``).

    ``gateway`` is the process's ``RedisGateway``: while it reports Redis down, L2 is skipped
    at no cost (no timeouts) and the cache serves from L1 and the loader. ``clock`` returns
    wall-clock seconds (shared meaning across processes); tests inject one to move time.
    """

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
        self._listening = False
        self._tasks: list[asyncio.Task[None]] = []
        self._redis_back = asyncio.Event()
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
        gateway.on_change(self._on_redis_change)
        self._children = {
            "hit_l1": m.HITS.labels(name, "l1"),
            "hit_l2": m.HITS.labels(name, "l2"),
            "miss_l1": m.MISSES.labels(name, "l1"),
            "miss_l2": m.MISSES.labels(name, "l2"),
        }

    # ==== life cycle =========================================================================
    async def start(self) -> None:
        """Read the namespace version and start the pub/sub listener and the resync loop."""
        if self._started:
            return
        self._started = True
        self._closed = False
        if self.gateway.is_up:
            self._redis_back.set()
        try:
            async with self._redis() as r:
                raw = await r.get(self._ver_key)
            self._set_version(int(raw or 0))
        except RedisUnavailable:
            self._note_degraded()
        loop = asyncio.get_running_loop()
        self._tasks.append(
            loop.create_task(self._listen_forever(), name=f"cache-{self.name}-pubsub")
        )
        self._tasks.append(
            loop.create_task(self._resync_forever(), name=f"cache-{self.name}-resync")
        )

    async def close(self) -> None:
        """Stop the background tasks (refreshes in flight are cancelled; nothing is lost)."""
        self._closed = True
        self._started = False
        tasks = [*self._tasks, *self._refreshing, *self._reads.values(), *self._flights.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):  # cancelled or failed: fine at shutdown
                await task
        self._tasks.clear()
        self._flush_metrics()

    # ==== public API ========================================================================
    async def get_or_load(
        self,
        key: str,
        loader: Loader[T],
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
    ) -> T:
        """The value for ``key``: from L1, else L2, else ``loader()`` (once per process and,
        through a Redis lease, ideally once across processes). May be stale within the
        configured windows; use ``fetch`` to know. A loader error with no stale value to
        serve propagates unchanged."""
        entry = self.l1.get(key)
        if entry is not None and not entry.tags:
            now = self.clock()
            if now < entry.fresh_until and now < entry.trust_until:
                self._hits_l1 += 1  # the L1 hit, inlined: most calls end here
                return entry.value  # type: ignore[no-any-return]
        return (await self.fetch(key, loader, ttl=ttl, tags=tags)).value

    def peek(self, key: str) -> Any:
        """The value for ``key`` if this process holds it fresh in memory, else None (then
        ``fetch`` it). Synchronous: for hot paths that would rather not start a coroutine
        for what is almost always a memory hit. Counts as an L1 hit; untagged keys only."""
        entry = self.l1.get(key)
        if entry is None or entry.tags:
            return None
        now = self.clock()
        if now < entry.fresh_until and now < entry.trust_until:
            self._hits_l1 += 1
            return entry.value
        return None

    async def fetch(
        self,
        key: str,
        loader: Loader[T],
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
    ) -> CacheResult[T]:
        """``get_or_load`` that also says whether the value is stale and which tier served it."""
        now = self.clock()
        entry = self.l1.get(key)
        if entry is not None:
            if entry.tags and not self._tags_current(entry.tags):
                self.l1.pop(key)
                entry = None
            elif now < entry.fresh_until and now < entry.trust_until:
                self._hits_l1 += 1
                return CacheResult(entry.value, False, "l1")
        self._miss_l1 += 1
        if key in _loading.get():
            raise RecursiveLoad(f"the loader of {key!r} asked for {key!r}")
        # Concurrent misses of one key share one L2 read and one load: 1 000 callers cost
        # one GET, not 1 000 (which would also exhaust the Redis pool). The first caller
        # resolves inline (no task: an L2 hit costs one GET, not a GET and a loop turn);
        # the others wait on its future.
        result: CacheResult[T]
        while True:
            shared = self._reads.get(key)
            if shared is None:
                stale = entry if entry is not None and now < entry.stale_until else None
                result = await self._lead(key, loader, ttl, tags, stale)
                break
            try:
                result = await asyncio.shield(shared)
                break
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                # The leader was cancelled, not us: take over (the load itself is a
                # separate task and goes on; we join it).
        if result.source == "l2" and not result.stale:
            self._hits_l2 += 1
        elif result.source == "loader":
            self._miss_l2 += 1
        return result

    async def _lead(
        self,
        key: str,
        loader: Loader[T],
        ttl: float | None,
        tags: Sequence[str],
        stale: Entry | None,
    ) -> CacheResult[T]:
        shared: asyncio.Future[CacheResult[T]] = asyncio.get_running_loop().create_future()
        self._reads[key] = shared
        token = _loading.set(_loading.get() | {key})
        try:
            result = await self._resolve(key, loader, ttl, tags, stale)
        except asyncio.CancelledError:
            shared.cancel()
            raise
        except BaseException as exc:
            shared.set_exception(exc)
            shared.exception()  # retrieved: there may be no follower
            raise
        else:
            shared.set_result(result)
            return result
        finally:
            _loading.reset(token)
            if self._reads.get(key) is shared:
                del self._reads[key]

    async def _resolve(
        self,
        key: str,
        loader: Loader[T],
        ttl: float | None,
        tags: Sequence[str],
        stale: Entry | None,
    ) -> CacheResult[T]:
        """An L1 miss: L2, else stale-while-revalidate, else one load (stale-if-error)."""
        stale_source: Source = "l1"
        from_l2 = await self._l2_get(key)
        now = self.clock()
        if from_l2 is not None:
            if now < from_l2.fresh_until:
                return CacheResult(from_l2.value, False, "l2")
            if now < from_l2.stale_until:
                if stale is not None:  # keep the fail-safe throttle across re-reads
                    from_l2.retry_at = max(from_l2.retry_at, stale.retry_at)
                stale, stale_source = from_l2, "l2"
        if stale is not None and now < stale.fresh_until and not self.gateway.is_up:
            # L1 stopped trusting it (CACHE_L1_TTL) but Redis cannot confirm: still fresh.
            return CacheResult(stale.value, False, "l1")
        if stale is not None and (
            now < stale.fresh_until + self.stale_while_revalidate or now < stale.retry_at
        ):
            reason = "error" if now < stale.retry_at else "revalidate"
            if reason == "revalidate":
                self._refresh_in_background(key, loader, ttl, tags)
            m.STALE_SERVED.labels(self.name, reason).inc()
            return CacheResult(stale.value, True, stale_source)
        try:
            return await self._single_flight(key, loader, ttl, tags)
        except Exception as exc:
            if stale is None:
                raise
            stale.retry_at = now + self.fail_safe_throttle
            self.l1.put(key, stale)
            m.STALE_SERVED.labels(self.name, "error").inc()
            log.warning(
                "cache.stale_if_error",
                cache=self.name,
                key=key,
                age_s=round(now - stale.fresh_until, 3),
                error=f"{type(exc).__name__}: {exc}",
            )
            return CacheResult(stale.value, True, stale_source)

    async def get(self, key: str, default: Any = None) -> Any:
        """The fresh value for ``key`` from L1 or L2, else ``default`` (never calls a loader)."""
        now = self.clock()
        entry = self.l1.get(key)
        if entry is not None:
            if entry.tags and not self._tags_current(entry.tags):
                self.l1.pop(key)
            elif now < entry.fresh_until and now < entry.trust_until:
                self._hits_l1 += 1
                return entry.value
        self._miss_l1 += 1
        from_l2 = await self._l2_get(key)
        if from_l2 is not None and self.clock() < from_l2.fresh_until:
            self._hits_l2 += 1
            return from_l2.value
        self._miss_l2 += 1
        return default

    async def set(
        self, key: str, value: Any, *, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None:
        """Store ``value`` in L1 and L2 and make other processes drop their L1 copy."""
        versions = await self._tag_versions(tags)
        entry, blob = self._make_entry(value, ttl, versions)
        if blob is not None:
            try:
                async with self._redis() as r, r.pipeline(transaction=True) as pipe:
                    pipe.set(self._prefix + key, blob, px=self._px(entry))
                    pipe.delete(self._lease_key(key))
                    await pipe.execute()
            except RedisUnavailable:
                self._note_degraded()
        await self._invalidate_keys([key], drop_l2=False)
        self.l1.put(key, entry)

    async def delete(self, *keys: str) -> None:
        """Drop ``keys`` everywhere: this L1, L2, every other process's L1 (pub/sub)."""
        await self._invalidate_keys(list(keys), drop_l2=True)

    async def invalidate_tags(self, *tags: str) -> None:
        """Make every entry carrying one of ``tags`` a miss, in every process. O(tags): each
        tag is a version counter in Redis; entries remember the versions they were built on."""
        if not tags:
            return
        m.INVALIDATIONS.labels(self.name, "tag").inc(len(tags))
        try:
            result = await self._run_invalidate("t", list(tags))
        except RedisUnavailable:
            self._epoch += 1  # no new version to compare with: in-flight fills must not land
            self._note_degraded()
            self._queue_pending(tags=tags)
            self._drop_local_tags(frozenset(tags))
            return
        data = result[1]
        for i in range(0, len(data), 2):
            self._raise_tag(_text(data[i]), int(data[i + 1]))

    async def clear(self) -> None:
        """Forget everything in this namespace, in O(1): bump the namespace version (old L2
        keys become unreachable and expire on their own) and tell every process to drop L1."""
        self._epoch += 1
        self.l1.clear()
        m.INVALIDATIONS.labels(self.name, "clear").inc()
        try:
            result = await self._run_invalidate("c", [])
        except RedisUnavailable:
            self._note_degraded()
            self._pending_clear = True
            return
        self._set_version(int(result[1][0]))

    async def warm(
        self,
        keys: Iterable[str],
        loader: BatchLoader[Any],
        *,
        ttl: float | None = None,
        tags: Sequence[str] | Callable[[str], Sequence[str]] = (),
        chunk: int = 500,
    ) -> int:
        """Preload ``keys``: copy L2 hits into L1, batch-load the rest with one
        ``loader(missing_keys) -> {key: value}`` call per ``chunk`` keys, write them to both
        tiers. Keys the loader leaves out stay uncached. Returns how many keys were loaded."""
        loaded = 0
        key_list = list(keys)
        for start in range(0, len(key_list), chunk):
            part = key_list[start : start + chunk]
            now = self.clock()
            missing = [k for k in part if not self._l1_fresh(k, now)]
            if missing:
                found = await self._l2_get_many(missing)
                missing = [k for k in missing if k not in found]
            if not missing:
                continue
            epoch = self._epoch
            writes: list[tuple[str, bytes, int]] = []
            with self._watching(missing):
                tag_list = {k: list(tags(k) if callable(tags) else tags) for k in missing}
                versions = await self._tag_versions(
                    sorted({t for ts in tag_list.values() for t in ts})
                )
                values = await self._timed_load(functools.partial(loader, missing))
                for k, value in values.items():
                    if k not in tag_list:
                        continue  # the loader answered a key nobody asked for
                    entry, blob = self._make_entry(
                        value, ttl, {t: versions[t] for t in tag_list[k]}
                    )
                    if self._may_fill(k, epoch):
                        self.l1.put(k, entry)
                    if blob is not None:
                        writes.append((self._prefix + k, blob, self._px(entry)))
                    loaded += 1
            if writes:
                try:
                    async with self._redis() as r, r.pipeline(transaction=False) as pipe:
                        for full, blob, px in writes:
                            pipe.set(full, blob, px=px, nx=True)
                        await pipe.execute()
                except RedisUnavailable:
                    self._note_degraded()
        return loaded

    def stats(self) -> dict[str, Any]:
        """Counters since start, for ``/api/admin/metrics`` and ``surge doctor``."""
        lookups = self._hits_l1 + self._miss_l1
        hits = self._hits_l1 + self._hits_l2
        return {
            "name": self.name,
            "l1_entries": len(self.l1),
            "l1_max_entries": self.l1.max_entries,
            "hits_l1": self._hits_l1,
            "hits_l2": self._hits_l2,
            "misses_l1": self._miss_l1,
            "misses_l2": self._miss_l2,
            "hit_ratio": round(hits / lookups, 4) if lookups else None,
            "evictions": self.l1.evictions,
            "degraded": self._degraded,
            "namespace_version": self._ver,
        }

    # ==== DB transactions ====================================================================
    def invalidate_on_commit(
        self, session: AsyncSession, *, keys: Sequence[str] = (), tags: Sequence[str] = ()
    ) -> None:
        """Invalidate ``keys``/``tags`` after ``session``'s unit of work commits, never before
        (a reader could otherwise reload the old row and cache it again) and never on rollback."""
        keys, tags = tuple(keys), tuple(tags)

        async def _invalidate() -> None:
            if keys:
                await self.delete(*keys)
            if tags:
                await self.invalidate_tags(*tags)

        on_commit(session, _invalidate)

    # ==== L2 ================================================================================
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

    async def _l2_get(self, key: str) -> Entry | None:
        """The hottest Redis path, kept lean (no context-manager layers): an L2 hit must cost
        little more than the GET itself (``bench/cache.py``: target ≤ 1.3 × a raw GET)."""
        gateway = self.gateway
        if not gateway.is_up:
            return None
        prefix, epoch = self._prefix, self._epoch
        watched = self._watched
        watched[key] = watched.get(key, 0) + 1
        try:
            slots = self._l2_slots
            if not slots.try_take():
                await slots.take()
            try:
                blob = await gateway.raw.get(prefix + key)
            except _REDIS_DOWN as exc:
                await self._gateway_verdict(exc)
                return None
            except RedisError as exc:
                self._l2_error(exc)
                return None
            finally:
                slots.give()
            if blob is None:
                return None
            entry: Entry | None = self._decode_plain(blob)
            if entry is _NEEDS_TAGS:
                entry = await self._decode(blob)
            if entry is not None and self._may_fill(key, epoch):  # no delete meanwhile
                self.l1.put(key, entry)
            return entry
        finally:
            left = watched[key] - 1
            if left:
                watched[key] = left
            else:
                del watched[key]
                self._dirty.discard(key)

    async def _l2_get_many(self, keys: list[str]) -> dict[str, Entry]:
        if not keys or not self.gateway.is_up:
            return {}
        with self._watching(keys):
            return await self._l2_get_many_watched(keys)

    async def _l2_get_many_watched(self, keys: list[str]) -> dict[str, Entry]:
        epoch = self._epoch
        try:
            async with self._redis() as r:
                blobs = await r.mget([self._prefix + k for k in keys])
        except RedisUnavailable:
            self._note_degraded()
            return {}
        found: dict[str, Entry] = {}
        now = self.clock()
        for k, blob in zip(keys, blobs, strict=True):
            entry = await self._decode(blob) if blob is not None else None
            if entry is not None and now < entry.fresh_until:
                if self._may_fill(k, epoch):
                    self.l1.put(k, entry)
                found[k] = entry
        return found

    def _decode_plain(self, blob: bytes | str) -> Any:
        """``_decode`` without I/O: the entry, None, or ``_NEEDS_TAGS`` (tags to check)."""
        try:
            fmt, fresh_until, stale_until, tag_names, _, value = msgpack.unpackb(blob)
        except (ValueError, TypeError, msgpack.UnpackException):
            return None
        if fmt != _FORMAT:
            return None
        if tag_names:
            return _NEEDS_TAGS
        trust = min(fresh_until, self.clock() + self.l1_ttl)
        return Entry(value, fresh_until, stale_until, trust)

    async def _decode(self, blob: bytes | str) -> Entry | None:
        """An L2 blob as an L1 entry, or None when unreadable or built on an old tag version."""
        try:
            fmt, fresh_until, stale_until, tag_names, tag_versions, value = msgpack.unpackb(blob)
        except (ValueError, TypeError, msgpack.UnpackException):
            return None
        if fmt != _FORMAT:
            return None
        tags: tuple[tuple[str, int], ...] = ()
        if tag_names:
            unknown = [t for t in tag_names if t not in self._tags]
            if unknown:
                await self._fetch_tags(unknown)
            tags = tuple(zip(tag_names, tag_versions, strict=True))
            if not self._tags_current(tags):
                return None
        trust = min(fresh_until, self.clock() + self.l1_ttl)
        return Entry(value, fresh_until, stale_until, trust, tags)

    def _make_entry(
        self, value: Any, ttl: float | None, versions: Mapping[str, int]
    ) -> tuple[Entry, bytes | None]:
        """Encode once; the L1 keeps the decoded copy so every process sees the same types."""
        now = self.clock()
        base = self.ttl if ttl is None else ttl
        # Jitter only shortens: the configured TTL stays an upper bound, and a batch written
        # together does not expire together (no synchronized reload wave).
        fresh_until = now + base * (1.0 - random.random() * self.ttl_jitter)
        stale_until = fresh_until + self.max_stale
        names = list(versions)
        try:
            blob: bytes | None = msgpack.packb(
                [_FORMAT, fresh_until, stale_until, names, [versions[n] for n in names], value]
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueNotCacheable(
                f"{type(value).__name__} is not msgpack-serializable ({exc}); cache plain "
                "dict/list/str/int/float/bool/None/bytes"
            ) from exc
        assert blob is not None
        decoded = msgpack.unpackb(blob)[5]
        if len(blob) > self.max_value_bytes:
            m.OVERSIZE.labels(self.name).inc()
            log.warning("cache.value_too_large", cache=self.name, bytes=len(blob))
            blob = None
        tags = tuple(versions.items())
        entry = Entry(decoded, fresh_until, stale_until, min(fresh_until, now + self.l1_ttl), tags)
        return entry, blob

    def _px(self, entry: Entry) -> int:
        return max(1, int((entry.stale_until - self.clock()) * 1000))

    # ==== loading ===========================================================================
    def _single_flight(
        self, key: str, loader: Loader[T], ttl: float | None, tags: Sequence[str]
    ) -> Awaitable[CacheResult[T]]:
        task = self._flights.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key, loader, ttl, tags))
            self._flights[key] = task
            task.add_done_callback(lambda t: self._flight_done(key, t))
        # shield: a caller that gives up (timeout, disconnect) does not cancel the others' load.
        return asyncio.shield(task)

    def _flight_done(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be left waiting for it

    def _refresh_in_background(
        self, key: str, loader: Loader[Any], ttl: float | None, tags: Sequence[str]
    ) -> None:
        if key in self._flights:
            return
        flight = self._single_flight(key, loader, ttl, tags)
        # _single_flight returned a shielded future; keep it so errors are consumed quietly.
        assert isinstance(flight, asyncio.Future)
        flight.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _load(
        self, key: str, loader: Loader[T], ttl: float | None, tags: Sequence[str]
    ) -> CacheResult[T]:
        with self._watching((key,)):
            return await self._load_watched(key, loader, ttl, tags)

    async def _load_watched(
        self, key: str, loader: Loader[T], ttl: float | None, tags: Sequence[str]
    ) -> CacheResult[T]:
        _loading.set(_loading.get() | {key})
        epoch = self._epoch
        prefix = self._prefix
        lease_key = self._lease_key(key)
        token = uuid.uuid4().hex
        holds_lease = False
        versions: dict[str, int] = {}
        if self.gateway.is_up:
            try:
                waited = False
                deadline = time.monotonic() + self.lease
                delay = 0.002
                unusable = "0"
                tag_keys = [f"{self.namespace}:t:{t}" for t in tags]
                px = int(self.lease * 1000)
                # One slot per call: a waiter must not hold a slot while it sleeps.
                while True:
                    async with self._redis() as r:
                        script = self._script(r, "value_or_lease", _VALUE_OR_LEASE)
                        state, blob, tag_values = await script(
                            keys=[prefix + key, lease_key, *tag_keys],
                            args=[token, px, unusable],
                        )
                    for t, v in zip(tags, tag_values, strict=True):
                        self._raise_tag(t, int(v or 0))
                    versions = {t: self._tags.get(t, 0) for t in tags}
                    if state == 2:
                        holds_lease = True
                        break
                    if state == 1:
                        entry = await self._decode(blob)
                        if entry is not None and self.clock() < entry.fresh_until:
                            if self._may_fill(key, epoch):
                                self.l1.put(key, entry)
                            return CacheResult(entry.value, False, "l2")
                        unusable = "1"  # expired or built on an old tag version
                        continue
                    unusable = "0"  # the holder may write it while we wait
                    if not waited:
                        waited = True
                        m.LEASE_WAITS.labels(self.name).inc()
                    if time.monotonic() >= deadline:
                        break  # the holder is slow or gone: load ourselves
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
            except RedisUnavailable:
                self._note_degraded()
        if tags and not versions:
            versions = {t: self._tags.get(t, 0) for t in tags}
        try:
            value = await self._timed_load(loader)
        except BaseException:
            if holds_lease:
                await self._release(lease_key, token)
            raise
        try:
            entry, blob = self._make_entry(value, ttl, versions)
        except BaseException:
            if holds_lease:
                await self._release(lease_key, token)
            raise
        written = True
        if blob is not None and self.gateway.is_up:
            try:
                async with self._redis() as r:
                    if holds_lease:
                        script = self._script(r, "set_if_lease", _SET_IF_LEASE)
                        written = bool(
                            await script(
                                keys=[prefix + key, lease_key], args=[token, blob, self._px(entry)]
                            )
                        )
                    else:
                        await r.set(prefix + key, blob, px=self._px(entry))
            except RedisUnavailable:
                self._note_degraded()
        if written and self._may_fill(key, epoch):
            self.l1.put(key, entry)
        return CacheResult(entry.value, False, "loader")

    async def _timed_load(self, loader: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        try:
            value = await loader()
        except BaseException:
            m.LOADS.labels(self.name, "error").inc()
            raise
        m.LOADS.labels(self.name, "ok").inc()
        m.LOAD_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        return value

    async def _release(self, lease_key: str, token: str) -> None:
        try:
            async with self._redis() as r:
                await self._script(r, "release", _RELEASE)(keys=[lease_key], args=[token])
        except RedisUnavailable:
            self._note_degraded()

    def _script(self, client: Any, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = client.register_script(source)
        return script

    # ==== fills racing invalidations =========================================================
    @contextlib.contextmanager
    def _watching(self, keys: Iterable[str]) -> Iterator[None]:
        """Mark ``keys`` as being read or loaded: a delete of one of them meanwhile makes it
        *dirty*, and a dirty key's result must not land in L1 (it may predate the delete)."""
        keys = tuple(keys)
        watched = self._watched
        for key in keys:
            watched[key] = watched.get(key, 0) + 1
        try:
            yield
        finally:
            for key in keys:
                left = watched[key] - 1
                if left:
                    watched[key] = left
                else:
                    del watched[key]
                    self._dirty.discard(key)

    def _drop_key(self, key: str) -> None:
        self.l1.pop(key)
        if key in self._watched:
            self._dirty.add(key)

    def _may_fill(self, key: str, epoch: int) -> bool:
        """L1 may keep a value read or loaded since ``epoch`` (no flush since, no delete of
        ``key`` since). Tag and namespace changes need no check: entries carry tag versions
        and the namespace version is in the key."""
        return epoch == self._epoch and key not in self._dirty

    # ==== tags ==============================================================================
    def _tags_current(self, tags: tuple[tuple[str, int], ...]) -> bool:
        known = self._tags
        return all(known.get(tag, 0) <= version for tag, version in tags)

    def _raise_tag(self, tag: str, version: int) -> None:
        if version > self._tags.get(tag, 0):
            self._tags[tag] = version
        if len(self._tags) > _MAX_TAGS:
            self._tags.clear()
            self.l1.clear()
            self._epoch += 1

    async def _tag_versions(self, tags: Sequence[str]) -> dict[str, int]:
        """Current versions of ``tags`` (read from Redis when up: entries must carry the
        versions that existed *before* their value was computed)."""
        if tags:
            await self._fetch_tags(list(tags))
        return {t: self._tags.get(t, 0) for t in tags}

    async def _fetch_tags(self, tags: list[str]) -> None:
        if not self.gateway.is_up:
            return
        try:
            async with self._redis() as r:
                values = await r.mget([f"{self.namespace}:t:{t}" for t in tags])
        except RedisUnavailable:
            self._note_degraded()
            return
        for t, v in zip(tags, values, strict=True):
            self._raise_tag(t, int(v or 0))

    def _drop_local_tags(self, tags: frozenset[str]) -> None:
        for key, entry in self.l1.items():
            if any(t in tags for t, _ in entry.tags):
                self.l1.pop(key)

    # ==== invalidation =======================================================================
    async def _run_invalidate(self, kind: str, names: list[str]) -> Any:
        ns = self.namespace
        if kind == "k":
            targets = [k for n in names for k in (self._prefix + n, self._lease_key(n))]
        elif kind == "t":
            targets = [f"{ns}:t:{n}" for n in names]
        else:
            targets = []
        args: list[Any] = [self._channel, self.origin, kind, _TAG_KEY_TTL_MS, *names]
        async with self._redis() as r:
            script = self._script(r, "invalidate", _INVALIDATE)
            return await script(keys=[self._seq_key, self._ver_key, *targets], args=args)

    async def _invalidate_keys(self, keys: list[str], *, drop_l2: bool) -> None:
        if not keys:
            return
        for key in keys:
            self._drop_key(key)
        m.INVALIDATIONS.labels(self.name, "key").inc(len(keys))
        try:
            if drop_l2:
                await self._run_invalidate("k", keys)
            else:
                await self._publish_only(keys)
        except RedisUnavailable:
            self._note_degraded()
            if drop_l2:
                self._queue_pending(keys=keys)

    async def _publish_only(self, keys: list[str]) -> None:
        """After ``set``: others drop their L1 copy and re-read the new value from L2."""
        async with self._redis() as r:
            script = self._script(r, "invalidate", _INVALIDATE)
            await script(
                keys=[self._seq_key, self._ver_key],
                args=[self._channel, self.origin, "k", _TAG_KEY_TTL_MS, *keys],
            )

    def _queue_pending(self, *, keys: Iterable[str] = (), tags: Iterable[str] = ()) -> None:
        self._pending_keys.update(keys)
        self._pending_tags.update(tags)
        if len(self._pending_keys) + len(self._pending_tags) > _MAX_PENDING:
            self._pending_clear = True
            self._pending_keys.clear()
            self._pending_tags.clear()

    async def _replay_pending(self) -> None:
        """Redis is back: apply the invalidations it missed while down."""
        keys, tags, clear = list(self._pending_keys), list(self._pending_tags), self._pending_clear
        self._pending_keys, self._pending_tags, self._pending_clear = set(), set(), False
        if not (keys or tags or clear):
            return
        log.info(
            "cache.replay_invalidations",
            cache=self.name,
            keys=len(keys),
            tags=len(tags),
            clear=clear,
        )
        try:
            if clear:
                await self.clear()
                return
            for start in range(0, len(keys), 500):
                await self._invalidate_keys(keys[start : start + 500], drop_l2=True)
            if tags:
                await self.invalidate_tags(*tags)
        except Exception:
            log.exception("cache.replay_failed", cache=self.name)

    # ==== coherence: pub/sub listener and resync =============================================
    def _set_version(self, version: int) -> None:
        if version != self._ver:
            if version < self._ver:
                log.warning(
                    "cache.namespace_version_reset", cache=self.name, was=self._ver, now=version
                )
            self._ver = version
            self._prefix = f"{self.namespace}:{version}:"
            self.l1.clear()
            self._epoch += 1

    def _flush_l1(self, reason: str) -> None:
        self.l1.clear()
        self._epoch += 1
        m.RESYNCS.labels(self.name, reason).inc()

    async def _listen_forever(self) -> None:
        first = True
        backoff = 0.1
        while not self._closed:
            await self._redis_back.wait()
            pubsub: PubSub | None = None
            try:
                pubsub = self.gateway.raw.pubsub()
                await pubsub.subscribe(self._channel)
                # Wait for the confirmation so every message after the baseline reaches us.
                while (await pubsub.get_message(timeout=1.0)) is None:
                    pass
                seq_raw, ver_raw = await self.gateway.raw.mget([self._seq_key, self._ver_key])
                self._last_seq = self._seen_remote = int(seq_raw or 0)
                self._set_version(int(ver_raw or 0))
                if not first:
                    # Messages sent while we were not listening are lost: start clean.
                    self._flush_l1("reconnect")
                    self._tags.clear()
                    log.info("cache.listener_reconnected", cache=self.name)
                first = False
                backoff = 0.1
                self._listening = True
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except CONNECTION_ERRORS as exc:
                self._listening = False
                log.debug("cache.listener_lost", cache=self.name, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 3.0)
            except Exception:
                self._listening = False
                log.exception("cache.listener_failed", cache=self.name)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 3.0)
            finally:
                self._listening = False
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # the connection is already broken
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_message(self, data: bytes) -> None:
        try:
            seq, origin, kind, payload = msgpack.unpackb(data)
        except (ValueError, TypeError, msgpack.UnpackException):
            log.warning("cache.bad_message", cache=self.name)
            return
        seq = int(seq)
        if seq > self._last_seq:
            if seq != self._last_seq + 1:
                self._gap(f"seq {self._last_seq + 1}..{seq - 1} missing")
            self._last_seq = seq
        if _text(origin) == self.origin:
            return  # applied locally when sent
        kind = _text(kind)
        if kind == "k":
            for key in payload:
                self._drop_key(_text(key))
        elif kind == "t":
            for i in range(0, len(payload), 2):
                self._raise_tag(_text(payload[i]), int(payload[i + 1]))
        elif kind == "c":
            self._set_version(int(payload[0]))
            self.l1.clear()

    def _gap(self, detail: str) -> None:
        log.warning("cache.invalidation_gap", cache=self.name, detail=detail)
        self._flush_l1("gap")
        self._tags.clear()

    async def _resync_forever(self) -> None:
        """Every ``resync_interval``: compare the invalidation counter with what we received.
        Messages are published atomically with their INCR, so any seq the counter showed one
        interval ago must have arrived by now; if not, some were lost: flush L1. This bounds
        the staleness a lost message can cause to about two intervals."""
        while not self._closed:
            await asyncio.sleep(self.resync_interval)
            self._flush_metrics()
            if not self._listening or not self.gateway.is_up:
                continue
            try:
                async with self._redis() as r:
                    seq_raw, ver_raw = await r.mget([self._seq_key, self._ver_key])
            except RedisUnavailable:
                self._note_degraded()
                continue
            remote = int(seq_raw or 0)
            if remote < self._last_seq:
                self._gap(f"counter went back from {self._last_seq} to {remote} (Redis reset?)")
                self._last_seq = remote
            elif self._seen_remote > self._last_seq:
                self._gap(f"seq up to {self._seen_remote} published, {self._last_seq} received")
                self._last_seq = self._seen_remote
            self._seen_remote = remote
            self._set_version(int(ver_raw or 0))

    # ==== Redis up/down ======================================================================
    def _on_redis_change(self, up: bool) -> None:
        if up:
            self._redis_back.set()
            if self._degraded:
                self._degraded = False
                m.DEGRADED.labels(self.name).set(0)
                log.info("cache.redis_recovered", cache=self.name)
                if self._started:
                    task = asyncio.get_running_loop().create_task(self._replay_pending())
                    self._refreshing.add(task)
                    task.add_done_callback(self._refreshing.discard)
        else:
            self._redis_back.clear()
            self._note_degraded()

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

    def _l1_fresh(self, key: str, now: float) -> bool:
        entry = self.l1.get(key)
        return (
            entry is not None
            and now < entry.fresh_until
            and now < entry.trust_until
            and (not entry.tags or self._tags_current(entry.tags))
        )

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
