"""Who is on the free plan, known without a lookup per user (issue 19, ADR 0050).

Seed 003's batch checks ask about random users of the whole population; 60 % of them have
never had a subscription, so their answer is "free" — and before this each of them cost a
Redis miss and a database load the first time in each TTL, which is what kept a cold start
at 65 % cache hits. ``FreeUsers`` is this process's snapshot of *the users that exist and
have no subscription row at all* (a paying, expired or cancelled user has a row and is never
in it), answered from memory:

- **compact**: the ids sorted as two ``array('Q')`` of their high and low 64 bits, read
  from PostgreSQL as one ``bytea`` (``uuid_send`` in id order: no Python object per row);
  16 bytes a user (1 M users, all free: 16 MB per process; seed 003's 300 000 at 60 % free:
  2.9 MB); a membership test is a binary search (``bisect`` in C, about 1 µs);
- **kept correct by the same invalidations as the cache tiers**: every key the privilege
  cache drops (a plan change here or in another process, ``Cache.on_drop``) is *dirty* and
  no longer answered from the snapshot until the next one; the snapshot is trusted only
  while the cache's ``coherence_mark`` is the one it was built at (Redis up, subscribed, no
  invalidation possibly missed: a gap, a reconnect or a ``clear`` ends it), and not while
  an invalidation waits unread on the socket (``Cache.unread_invalidation``, a lagging
  event loop: the memory tier defers to Redis then too);
- **a paying user is never answered as free from it**: they have a subscription row, so
  they are not in a snapshot taken after it was written, and a row written after the
  snapshot began is invalidated after its commit, which marks it dirty (the build collects
  the drops made while it runs, from before its query starts);
- **rebuilt** when it stops being trusted, when too many users are dirty, and every
  ``max_age`` seconds (the same safety net the Redis TTL is for a write that bypassed the
  service and its invalidation).

Users registered after the snapshot, ids nobody has, and everyone dirty go through the
cache tiers as before. This module knows nothing of plans: the store decides what "free"
answers.
"""

from __future__ import annotations

import sys
import time
import uuid
from array import array
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence

import structlog

from surge.kit.cache import Cache

log = structlog.get_logger()

_LOW = (1 << 64) - 1


class FreeUsers:
    """A snapshot of the users with no subscription, coherent with ``cache`` (see module)."""

    def __init__(self, cache: Cache, *, max_dirty: int = 10_000, max_age: float = 1800.0) -> None:
        self.cache = cache
        self.max_dirty = max_dirty
        self.max_age = max_age
        self._his = array("Q")
        self._los = array("Q")
        #: The cache's coherence mark when the snapshot was taken; None: no snapshot.
        self._mark: int | None = None
        #: Keys dropped (invalidated) since the snapshot's build began.
        self._dirty: set[str] = set()
        #: While a build runs: the keys dropped since it began (its own dirty set).
        self._building: set[str] | None = None
        self.built_at = 0.0  # time.monotonic()
        cache.on_drop(self._dropped)

    def __len__(self) -> int:
        return len(self._his)

    def _dropped(self, key: str) -> None:
        self._dirty.add(key)
        if self._building is not None:
            self._building.add(key)
        if len(self._dirty) > self.max_dirty:
            self._mark = None  # too many exceptions to carry: rebuild first

    def _current(self) -> bool:
        """A snapshot exists and no invalidation may have been missed since it was taken."""
        return self._mark is not None and self.cache.coherence_mark() == self._mark

    @property
    def trusted(self) -> bool:
        """``_current``, and no invalidation waiting unread on the socket right now (a
        lagging event loop: the memory tier defers to Redis then, and so does this)."""
        return self._current() and not self.cache.unread_invalidation()

    def stale(self) -> bool:
        """Due for a rebuild: not current, older than ``max_age``, or half full of dirt."""
        return (
            not self._current()
            or time.monotonic() - self.built_at > self.max_age
            or len(self._dirty) > self.max_dirty // 2
        )

    def is_free(self, user_id: uuid.UUID, key: str) -> bool:
        """``user_id`` (whose cache key is ``key``) is known to have no subscription."""
        return self.trusted and key not in self._dirty and self._holds(user_id.int)

    def free_among(self, user_ids: Sequence[uuid.UUID], keys: Sequence[str]) -> list[bool]:
        """``is_free`` for many (the trust check once)."""
        if not self.trusted:
            return [False] * len(keys)
        dirty, holds = self._dirty, self._holds
        return [k not in dirty and holds(u.int) for u, k in zip(user_ids, keys, strict=True)]

    def _holds(self, n: int) -> bool:
        hi, lo = n >> 64, n & _LOW
        his, los = self._his, self._los
        i = bisect_left(his, hi)
        size = len(his)
        while i < size and his[i] == hi:  # equal high halves: ~never among random ids
            if los[i] == lo:
                return True
            i += 1
        return False

    async def rebuild(self, snapshot: Callable[[], Awaitable[bytes]]) -> bool:
        """Take a new snapshot: ``snapshot()`` returns the free users' ids as concatenated
        16-byte big-endian UUIDs in ascending order (one SQL statement: one consistent
        view). Returns whether it was installed (not when the cache cannot vouch for the
        invalidations meanwhile: then the old one, if still trusted, stays)."""
        mark = self.cache.coherence_mark()
        if mark is None:
            return False
        started = time.monotonic()
        self._building = set()  # before the query: every later commit's drop lands here
        try:
            blob = await snapshot()
        finally:
            building, self._building = self._building, None
        if self.cache.coherence_mark() != mark or len(building) > self.max_dirty:
            return False
        words = array("Q")
        words.frombytes(blob)
        if sys.byteorder == "little":
            words.byteswap()  # uuid_send is big-endian: the halves compare as unsigned ints
        self._his, self._los = words[0::2], words[1::2]
        self._dirty = building
        self._mark = mark
        self.built_at = started
        log.info(
            "identity.free_users.built",
            users=len(self._his),
            kib=round(2 * self._his.itemsize * len(self._his) / 1024),
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return True
