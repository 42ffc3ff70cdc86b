"""``Cache``: L1 (process LRU) → L2 (Redis) → loader, coherent across processes.

See the package docstring for the public API and ``docs/adr/0005-tiered-cache.md`` for why.
The class is assembled from private parts, each one seam of the design (ADR 0013):

- ``_base``: constructor state, the guarded L2 client, degraded-mode bookkeeping, metrics;
- ``_scripts``: the Lua scripts (one atomic round trip each);
- ``_coherence``: invalidation, the pub/sub listener, gap detection and resync;
- ``_codec``: the L2 value format;
- ``_read``: L2 reads and single-flight loading;
- this module: life cycle and the public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import msgpack  # type: ignore[import-untyped]
import structlog

from surge.kit.cache import metrics as m
from surge.kit.cache._base import (
    BatchLoader,
    CacheResult,
    Loader,
    RecursiveLoad,
    Source,
    T,
    _loading,
    refresh_early,
)
from surge.kit.cache._l1 import Entry
from surge.kit.cache._read import _ReadPath
from surge.kit.cache._scripts import _SET_MANY_NX
from surge.kit.pubsub import ChannelListener
from surge.kit.redis import RedisUnavailable

__all__ = ["Cache"]

log = structlog.get_logger()


class Cache(_ReadPath):
    """A tiered cache: L1 process LRU → L2 Redis → loader. One per process (``runtime.cache``).

    ``gateway`` is the process's ``RedisGateway``: while it reports Redis down, L2 is skipped
    at no cost (no timeouts) and the cache serves from L1 and the loader. ``clock`` returns
    wall-clock seconds (shared meaning across processes); tests inject one to move time.
    """

    # ==== life cycle =========================================================================
    async def start(self) -> None:
        """Read the namespace version and start the pub/sub listener and the resync loop."""
        if self._started:
            return
        self._started = True
        self._closed = False
        try:
            async with self._redis() as r:
                raw = await r.get(self._ver_key)
            self._set_version(int(raw or 0))
        except RedisUnavailable:
            self._note_degraded()
        loop = asyncio.get_running_loop()
        if self._listener is None:
            self._listener = ChannelListener(
                self.gateway, self._channel, self._on_message,
                on_subscribed=self._on_subscribed, name=f"cache-{self.name}",
            )  # fmt: skip
            self.l1.suspect = self._listener.pending
        self._listener.start()
        self._tasks.append(
            loop.create_task(self._resync_forever(), name=f"cache-{self.name}-resync")
        )

    async def close(self) -> None:
        """Stop the background tasks (refreshes in flight are cancelled; nothing is lost)."""
        self._closed = True
        self._started = False
        if self._listener is not None:
            await self._listener.close()
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
                window = (self.ttl if ttl is None else ttl) * self.early_refresh
                if now > entry.fresh_until - window:
                    self._early(key, loader, ttl, tags, fresh_until=entry.fresh_until, now=now)
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
            if refresh_early(entry.fresh_until, now, self.ttl * self.early_refresh):
                return None  # the caller's fetch (it has the loader) refreshes it early
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
                window = (self.ttl if ttl is None else ttl) * self.early_refresh
                if now > entry.fresh_until - window:
                    self._early(key, loader, ttl, tags, fresh_until=entry.fresh_until, now=now)
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

    def _early(
        self,
        key: str,
        loader: Loader[Any],
        ttl: float | None,
        tags: Sequence[str],
        *,
        fresh_until: float,
        now: float,
    ) -> None:
        """A hit near expiry: maybe refresh in the background (``refresh_early``)."""
        window = (self.ttl if ttl is None else ttl) * self.early_refresh
        if key not in self._flights and refresh_early(fresh_until, now, window):
            m.EARLY_REFRESHES.labels(self.name).inc()
            self._refresh_in_background(key, loader, ttl, tags, newer_than=fresh_until)

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
                window = (self.ttl if ttl is None else ttl) * self.early_refresh
                if now > from_l2.fresh_until - window:
                    self._early(key, loader, ttl, tags, fresh_until=from_l2.fresh_until, now=now)
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
        written = False
        if blob is not None:
            try:
                async with self._redis() as r, r.pipeline(transaction=True) as pipe:
                    pipe.set(self._prefix + key, blob, px=self._px(entry))
                    pipe.delete(self._lease_key(key))
                    await pipe.execute()
                written = True
            except RedisUnavailable:
                self._note_degraded()
        # Not written: L2 still holds the old value, which others would re-read: drop it
        # (deferred like any invalidation when Redis cannot be reached).
        await self._invalidate_keys([key], drop_l2=not written)
        self.l1.put(key, entry)

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
            tag_list = {k: list(tags(k) if callable(tags) else tags) for k in missing}
            loaded += len(await self._load_batch(missing, loader, ttl, tag_list))
        return loaded

    async def fetch_many(
        self, keys: Sequence[str], loader: BatchLoader[Any], *, ttl: float | None = None
    ) -> dict[str, CacheResult[Any]]:
        """``fetch`` for many untagged keys at once, each result saying which tier answered:
        L1, then one MGET for the L1 misses, then one ``loader(missing) -> {key: value}`` call
        for the rest (written to both tiers in one Redis command). Keys the loader leaves out
        are left out of the result. Stale-if-error as ``fetch``: a key whose last value is
        within ``max_stale`` is answered stale (``stale=True``) when the loader fails or
        failed less than ``fail_safe_throttle`` ago; if the loader fails and some key has no
        such value, the loader's error propagates. No coroutine per key: a batch of 50
        misses costs one MGET and one load, not 50 ``fetch`` calls (issue 19)."""
        out: dict[str, CacheResult[Any]] = {}
        stale: dict[str, Entry] = {}
        expired_in_l2: set[str] = set()  # to overwrite, not to keep (see _SET_MANY_NX)
        missing: list[str] = []
        now = self.clock()
        l1 = self.l1
        for key in keys:
            entry = l1.get(key)
            if entry is not None and not entry.tags:
                if now < entry.fresh_until and now < entry.trust_until:
                    out[key] = CacheResult(entry.value, False, "l1")
                    continue
                if now < entry.stale_until:
                    stale[key] = entry
            missing.append(key)
        self._hits_l1 += len(out)
        self._miss_l1 += len(missing)
        if not missing:
            return out
        if self.gateway.is_up:
            with self._watching(missing):
                found = await self._l2_get_many_watched(missing, keep_stale=True)
            now = self.clock()
            rest: list[str] = []
            for key in missing:
                entry = found.get(key)
                if entry is not None and now < entry.fresh_until:
                    out[key] = CacheResult(entry.value, False, "l2")
                    continue
                if entry is not None:
                    expired_in_l2.add(key)
                if entry is not None and now < entry.stale_until:
                    old = stale.get(key)
                    if old is not None:  # keep the fail-safe throttle across re-reads
                        entry.retry_at = max(entry.retry_at, old.retry_at)
                    stale[key] = entry
                rest.append(key)
            self._hits_l2 += len(missing) - len(rest)
            missing = rest
        throttled = [k for k in missing if k in stale and now < stale[k].retry_at]
        if throttled:  # the loader failed moments ago: do not queue on it again
            for key in throttled:
                out[key] = CacheResult(stale[key].value, True, "l1")
            m.STALE_SERVED.labels(self.name, "error").inc(len(throttled))
            missing = [k for k in missing if k not in out]
        if not missing:
            return out
        self._miss_l2 += len(missing)
        try:
            loaded = await self._load_batch(missing, loader, ttl, None, replace=expired_in_l2)
        except Exception as exc:
            if any(k not in stale for k in missing):
                raise
            now = self.clock()
            for key in missing:
                entry = stale[key]
                entry.retry_at = now + self.fail_safe_throttle
                self.l1.put(key, entry)
                out[key] = CacheResult(entry.value, True, "l1")
            m.STALE_SERVED.labels(self.name, "error").inc(len(missing))
            log.warning(
                "cache.stale_if_error",
                cache=self.name,
                keys=len(missing),
                error=f"{type(exc).__name__}: {exc}",
            )
            return out
        for key, entry in loaded.items():
            out[key] = CacheResult(entry.value, False, "loader")
        return out

    async def _load_batch(
        self,
        missing: list[str],
        loader: BatchLoader[Any],
        ttl: float | None,
        tag_list: dict[str, list[str]] | None,
        *,
        replace: AbstractSet[str] = frozenset(),
    ) -> dict[str, Entry]:
        """One ``loader(missing)`` call; its values into L1 and, in one Redis command (SET NX
        each; plain SET for the ``replace`` keys, expired in L2), into L2 — neither for a key
        deleted while it loaded. The entries loaded."""
        epoch = self._epoch
        loaded: dict[str, Entry] = {}
        keys: list[str] = []
        args: list[bytes | int] = []
        wanted = set(missing)
        with self._watching(missing):
            versions: dict[str, int] = {}
            if tag_list:
                versions = await self._tag_versions(
                    sorted({t for ts in tag_list.values() for t in ts})
                )
            values = await self._timed_load(functools.partial(loader, missing))
            for k, value in values.items():
                if k not in wanted:
                    continue  # the loader answered a key nobody asked for
                mine = {t: versions[t] for t in tag_list[k]} if tag_list else {}
                entry, blob = self._make_entry(value, ttl, mine)
                loaded[k] = entry
                if not self._may_fill(k, epoch):
                    continue  # deleted meanwhile: answer the caller, cache nothing
                self.l1.put(k, entry)
                if blob is not None:
                    keys.append(self._prefix + k)
                    args += (blob, self._px(entry), 1 if k in replace else 0)
        if keys and self.gateway.is_up:
            try:
                async with self._redis() as r:
                    script = self._script(r, "set_many_nx", _SET_MANY_NX)
                    await script(keys=keys, args=[msgpack.packb(args, use_bin_type=False)])
            except RedisUnavailable:
                self._note_degraded()
        return loaded

    # ==== memos kept beside the cache ======================================================
    def on_drop(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(key)`` (synchronously, it must not block) for every key this
        process drops because it was invalidated, here or in another process (pub/sub).
        With ``coherence_mark`` it lets a caller keep its own memo of the source of truth
        (a compact snapshot, say) exactly as coherent as L1."""
        self._drop_listeners.append(listener)

    def coherence_mark(self) -> int | None:
        """While this process hears every invalidation (Redis up, subscribed): a number
        that changes whenever it may have missed some (an L1 flush after a gap, a reconnect,
        a ``clear``, a namespace change). A memo built from the source of truth while the
        mark read M, and told of every drop since (``on_drop``), is current while the mark
        still reads M. None: invalidations may be missed right now; trust no memo."""
        if not self.gateway.is_up or not self._listening:
            return None
        return self._epoch

    def unread_invalidation(self) -> bool:
        """True while an invalidation has reached this process's socket unread (a lagging
        event loop): the memory tier defers to Redis meanwhile (ADR 0028), and so must any
        memo kept with ``coherence_mark``."""
        suspect = self.l1.suspect
        return suspect is not None and suspect()

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
            "l1_bypasses": self.l1.bypasses,
            "degraded": self._degraded,
            "namespace_version": self._ver,
        }
