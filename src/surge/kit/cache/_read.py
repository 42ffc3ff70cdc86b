"""The read path below the public API: L2 reads (the lean GET), single-flight loading under
a lease, background refresh."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import (
    Awaitable,
    Callable,
    Sequence,
)
from typing import Any

import structlog
from redis.exceptions import RedisError

from surge.kit.cache import metrics as m
from surge.kit.cache._base import (
    _NEEDS_TAGS,
    _REDIS_DOWN,
    CacheResult,
    Loader,
    T,
    _loading,
)
from surge.kit.cache._codec import _Codec
from surge.kit.cache._l1 import Entry
from surge.kit.cache._scripts import _RELEASE, _SET_IF_LEASE, _VALUE_OR_LEASE
from surge.kit.db import primary_reads
from surge.kit.redis import RedisUnavailable, is_closed_transport

log = structlog.get_logger()


class _ReadPath(_Codec):
    """L2 reads and loader calls (``Cache`` inherits it)."""

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
            except RuntimeError as exc:  # uvloop: a write on a connection the peer reset
                if not is_closed_transport(exc):
                    raise
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

    async def _l2_get_many_watched(
        self, keys: list[str], *, keep_stale: bool = False
    ) -> dict[str, Entry]:
        """One MGET: the fresh entries (into L1 too); with ``keep_stale``, also the readable
        entries past their TTL (not into L1), for a caller that may serve them on error."""
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
            if blob is None:
                continue
            entry: Entry | None = self._decode_plain(blob)
            if entry is _NEEDS_TAGS:
                entry = await self._decode(blob)
            if entry is None:
                continue
            if now < entry.fresh_until:
                if self._may_fill(k, epoch):
                    self.l1.put(k, entry)
                found[k] = entry
            elif keep_stale:
                found[k] = entry
        return found

    # ==== loading ===========================================================================
    def _single_flight(
        self,
        key: str,
        loader: Loader[T],
        ttl: float | None,
        tags: Sequence[str],
        *,
        newer_than: float = 0.0,
    ) -> Awaitable[CacheResult[T]]:
        task = self._flights.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._load(key, loader, ttl, tags, newer_than=newer_than)
            )
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
        self,
        key: str,
        loader: Loader[Any],
        ttl: float | None,
        tags: Sequence[str],
        *,
        newer_than: float = 0.0,
    ) -> None:
        """One background load of ``key``; with ``newer_than`` (an early refresh), an L2
        entry only counts as already refreshed if it is fresh beyond that moment."""
        if key in self._flights:
            return
        flight = self._single_flight(key, loader, ttl, tags, newer_than=newer_than)
        # _single_flight returned a shielded future; keep it so errors are consumed quietly.
        assert isinstance(flight, asyncio.Future)
        flight.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _load(
        self,
        key: str,
        loader: Loader[T],
        ttl: float | None,
        tags: Sequence[str],
        *,
        newer_than: float = 0.0,
    ) -> CacheResult[T]:
        with self._watching((key,)):
            return await self._load_watched(key, loader, ttl, tags, newer_than=newer_than)

    async def _load_watched(
        self,
        key: str,
        loader: Loader[T],
        ttl: float | None,
        tags: Sequence[str],
        *,
        newer_than: float = 0.0,
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
                        if (
                            entry is not None
                            and self.clock() < entry.fresh_until
                            and entry.fresh_until > newer_than  # not the one being renewed
                        ):
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
            # A fill is kept after the invalidation it may follow: it reads the primary, since
            # a replica behind the invalidating write would be cached for a TTL (ADR 0060).
            with primary_reads():
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

    def _l1_fresh(self, key: str, now: float) -> bool:
        entry = self.l1.get(key)
        return (
            entry is not None
            and now < entry.fresh_until
            and now < entry.trust_until
            and (not entry.tags or self._tags_current(entry.tags))
        )
