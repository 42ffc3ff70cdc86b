"""Cross-process coherence: invalidation (keys, tags, namespace), the pub/sub listener with
gap detection and the periodic resync, fills that race an invalidation, and Redis
recovery (replaying what was missed).

An invalidation that cannot reach Redis (an outage, a pool busy past its retries, an error
reply) is never dropped: it is *deferred* (logged while Redis is up, counted in
``cache_invalidations_deferred_total``) and replayed when Redis comes back and, while Redis
is up, by the resync loop every ``resync_interval``: the staleness it can cause is bounded
by that interval, not by the entries' TTL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import (
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any

import msgpack  # type: ignore[import-untyped]
import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.cache import metrics as m
from surge.kit.cache._base import (
    _MAX_PENDING,
    _MAX_TAGS,
    _TAG_KEY_TTL_MS,
    _CacheBase,
    _text,
)
from surge.kit.cache._scripts import _INVALIDATE
from surge.kit.db import on_commit
from surge.kit.redis import RedisUnavailable

log = structlog.get_logger()

#: Attempts of one invalidation while Redis is up but this process's pool has no connection
#: free within its wait (a busy process, not an outage): each waits the pool's timeout.
_BUSY_ATTEMPTS = 5


class _Coherence(_CacheBase):
    """The invalidation side of ``Cache``."""

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
            result = await self._invalidate_waiting("t", list(tags))
        except RedisUnavailable:
            self._epoch += 1  # no new version to compare with: in-flight fills must not land
            self._note_degraded()
            self._defer(tags=tags)
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
            result = await self._invalidate_waiting("c", [])
        except RedisUnavailable:
            self._note_degraded()
            self._defer(clear=True)
            return
        self._set_version(int(result[1][0]))

    # ==== DB transactions ====================================================================
    def invalidate_on_commit(
        self, session: AsyncSession, *, keys: Sequence[str] = (), tags: Sequence[str] = ()
    ) -> None:
        """Invalidate ``keys``/``tags`` after ``session``'s unit of work commits, never before
        (a reader could otherwise reload the old row and cache it again) and never on rollback.
        The write is committed by then: whatever fails on the way (even the request being
        cancelled) defers the invalidation rather than losing it."""
        keys, tags = tuple(keys), tuple(tags)

        async def _invalidate() -> None:
            try:
                if keys:
                    await self.delete(*keys)
                if tags:
                    await self.invalidate_tags(*tags)
            except BaseException as error:
                for key in keys:
                    self._drop_key(key)
                self._defer(keys=keys, tags=tags, error=error)
                if not isinstance(error, Exception):
                    raise

        on_commit(session, _invalidate)

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
        for listener in self._drop_listeners:
            listener(key)

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
    async def _run_invalidate(self, kind: str, names: list[str], *, drop_l2: bool = True) -> Any:
        """One invalidation script: change L2 (unless ``drop_l2`` is False: keys are only
        announced, after ``set`` wrote their new value) and publish it to every process."""
        ns = self.namespace
        if kind == "k" and not drop_l2:
            targets = []
        elif kind == "k":
            targets = [k for n in names for k in (self._prefix + n, self._lease_key(n))]
        elif kind == "t":
            targets = [f"{ns}:t:{n}" for n in names]
        else:
            targets = []
        args: list[Any] = [self._channel, self.origin, kind, _TAG_KEY_TTL_MS, *names]
        async with self._redis() as r:
            script = self._script(r, "invalidate", _INVALIDATE)
            return await script(keys=[self._seq_key, self._ver_key, *targets], args=args)

    async def _invalidate_waiting(
        self, kind: str, names: list[str], *, drop_l2: bool = True
    ) -> Any:
        """``_run_invalidate``, waiting out a busy pool: while the gateway says Redis is up, a
        ``RedisUnavailable`` is this process having no connection free (or one error reply),
        and the invalidation is tried again, up to ``_BUSY_ATTEMPTS``. Giving up at once
        queued it for a replay that only an outage's end triggers: the write answered, Redis
        kept the old value for its TTL and every process read it back (a write read
        back stale under load). An outage raises at once (callers queue the replay)."""
        for attempt in range(1, _BUSY_ATTEMPTS + 1):
            try:
                return await self._run_invalidate(kind, names, drop_l2=drop_l2)
            except RedisUnavailable:
                if not self.gateway.is_up or attempt == _BUSY_ATTEMPTS:
                    raise
                self._note_degraded()  # counted: L2 errors of this cache
        raise AssertionError("unreachable")  # pragma: no cover

    async def _invalidate_keys(self, keys: list[str], *, drop_l2: bool) -> None:
        if not keys:
            return
        for key in keys:
            self._drop_key(key)
        m.INVALIDATIONS.labels(self.name, "key").inc(len(keys))
        try:
            # ``drop_l2`` False (after ``set``): others drop their L1 copy and re-read the new
            # value from L2; waits out a busy pool like every invalidation.
            await self._invalidate_waiting("k", keys, drop_l2=drop_l2)
        except RedisUnavailable:
            self._note_degraded()
            if drop_l2:  # an announcement alone is bounded by the others' L1 TTL
                self._defer(keys=keys)

    def _defer(
        self,
        *,
        keys: Iterable[str] = (),
        tags: Iterable[str] = (),
        clear: bool = False,
        error: BaseException | None = None,
    ) -> None:
        """Queue an invalidation that did not reach Redis for the replay (``_replay_pending``:
        on recovery, and every resync interval while Redis is up). Counted always; logged
        (at most every 10 s) unless Redis is down, which ``cache.degraded`` already says."""
        self._pending_keys.update(keys)
        self._pending_tags.update(tags)
        self._pending_clear = self._pending_clear or clear
        if len(self._pending_keys) + len(self._pending_tags) > _MAX_PENDING:
            self._pending_clear = True
            self._pending_keys.clear()
            self._pending_tags.clear()
        m.INVALIDATIONS_DEFERRED.labels(self.name).inc()
        now = time.monotonic()
        if (self.gateway.is_up or error is not None) and now >= self._next_defer_log:
            self._next_defer_log = now + 10.0
            why = (
                "busy pool or error reply" if error is None else f"{type(error).__name__}: {error}"
            )
            log.warning(
                "cache.invalidation_deferred", cache=self.name, retry_s=self.resync_interval,
                error=why[:200],
            )  # fmt: skip

    @property
    def _has_pending(self) -> bool:
        return bool(self._pending_keys or self._pending_tags or self._pending_clear)

    async def _replay_pending(self) -> None:
        """Apply the invalidations deferred meanwhile: Redis is back, or (the resync loop)
        they met a busy pool or an error reply while it was up."""
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

    async def _on_subscribed(self, resumed: bool) -> None:
        """The listener's SUBSCRIBE is confirmed: every message after this baseline reaches us.
        ``resumed``: messages sent while we were not listening are lost: start clean."""
        seq_raw, ver_raw = await self.gateway.raw.mget([self._seq_key, self._ver_key])
        self._last_seq = self._seen_remote = int(seq_raw or 0)
        self._set_version(int(ver_raw or 0))
        if resumed:
            self._flush_l1("reconnect")
            self._tags.clear()
            log.info("cache.listener_reconnected", cache=self.name)

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
            if self._has_pending and self.gateway.is_up:
                await self._replay_pending()
            if not self._listening or not self.gateway.is_up:
                continue
            # What we had received when the MGET left: the listener may take in newer
            # messages before its reply is read, and those must not look like a reset.
            received = self._last_seq
            try:
                async with self._redis() as r:
                    seq_raw, ver_raw = await r.mget([self._seq_key, self._ver_key])
            except RedisUnavailable:
                self._note_degraded()
                continue
            remote = int(seq_raw or 0)
            if remote < received:
                self._gap(f"counter went back from {received} to {remote} (Redis reset?)")
                self._last_seq = remote
            elif self._seen_remote > self._last_seq:
                self._gap(f"seq up to {self._seen_remote} published, {self._last_seq} received")
                self._last_seq = self._seen_remote
            self._seen_remote = remote
            self._set_version(int(ver_raw or 0))

    # ==== Redis up/down ======================================================================
    def _on_redis_change(self, up: bool) -> None:
        if up:
            if self._degraded:
                self._degraded = False
                m.DEGRADED.labels(self.name).set(0)
                log.info("cache.redis_recovered", cache=self.name)
                if self._started:
                    task = asyncio.get_running_loop().create_task(self._replay_pending())
                    self._refreshing.add(task)
                    task.add_done_callback(self._refreshing.discard)
        else:
            self._note_degraded()
