"""The L2 value codec: msgpack ``[format, fresh_until, stale_until, tag names, tag versions,
value]`` to and from L1 entries."""

from __future__ import annotations

import random
from collections.abc import (
    Mapping,
)
from typing import Any

import msgpack  # type: ignore[import-untyped]
import structlog

from surge.kit.cache import metrics as m
from surge.kit.cache._base import (
    _FORMAT,
    _NEEDS_TAGS,
    ValueNotCacheable,
)
from surge.kit.cache._coherence import _Coherence
from surge.kit.cache._l1 import Entry

log = structlog.get_logger()


class _Codec(_Coherence):
    """Encoding and decoding of L2 blobs (``Cache`` inherits it)."""

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
        trust = min(fresh_until, self.clock() + self._l1_trust())
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
        trust = min(fresh_until, self.clock() + self._l1_trust())
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
        entry = Entry(
            decoded, fresh_until, stale_until, min(fresh_until, now + self._l1_trust()), tags
        )
        return entry, blob

    def _l1_trust(self) -> float:
        """How long L1 trusts an entry without asking L2, jittered like the TTL: entries
        loaded together (a warm start) do not all go back to Redis in the same second."""
        return self.l1_ttl * (1.0 - random.random() * self.ttl_jitter)

    def _px(self, entry: Entry) -> int:
        return max(1, int((entry.stale_until - self.clock()) * 1000))
