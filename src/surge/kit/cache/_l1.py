"""The L1: an entry-count-bounded LRU of decoded values, in process memory."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any


class Entry:
    """One cached value and the clocks that say how far it can be trusted.

    ``fresh_until``/``stale_until`` come from the writer (shared by every process through
    L2); ``trust_until`` is local: after it L1 asks Redis again even if the value is fresh,
    which bounds how long a lost invalidation can hide (``CACHE_L1_TTL``).
    """

    __slots__ = ("fresh_until", "retry_at", "stale_until", "tags", "trust_until", "value")

    def __init__(
        self,
        value: Any,
        fresh_until: float,
        stale_until: float,
        trust_until: float,
        tags: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self.value = value
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        self.trust_until = trust_until
        self.tags = tags
        #: After a failed refresh, the loader is not called again before this (fail-safe throttle).
        self.retry_at = 0.0


class LRU:
    """``OrderedDict`` LRU: O(1) get/put, the least recently used entry goes first.

    Not thread-safe: one event loop owns it (asyncio code never yields inside its methods).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[str, Entry] = OrderedDict()
        self.evictions = 0
        #: True while an invalidation may have reached the process unapplied (the cache
        #: sets it to its listener's ``pending``): ``get`` then answers None, and the
        #: reader goes to Redis, which the writer changed before publishing (ADR 0028).
        self.suspect: Callable[[], bool] | None = None
        #: Entries not answered because ``suspect`` said so.
        self.bypasses = 0

    def get(self, key: str) -> Entry | None:
        entry = self._data.get(key)
        if entry is not None:
            suspect = self.suspect
            if suspect is not None and suspect():
                self.bypasses += 1
                return None
            self._data.move_to_end(key)
        return entry

    def stored(self, key: str) -> Entry | None:
        """The entry as stored, for inspection (no LRU touch, no ``suspect`` check)."""
        return self._data.get(key)

    def put(self, key: str, entry: Entry) -> None:
        if self.max_entries <= 0:
            return
        data = self._data
        data[key] = entry
        data.move_to_end(key)
        while len(data) > self.max_entries:
            data.popitem(last=False)
            self.evictions += 1

    def pop(self, key: str) -> Entry | None:
        return self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def items(self) -> Iterator[tuple[str, Entry]]:
        return iter(list(self._data.items()))

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data


class Slots:
    """A counting semaphore whose uncontended path is two integer operations and no
    coroutine frame (``asyncio.Semaphore`` costs two awaits per use on the L2 hot path)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        if self.used < self.size and not self._waiters:
            self.used += 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot (only after ``try_take`` said no)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # we were handed a slot as we got cancelled: pass it on
            elif waiter in self._waiters:  # a give() may already have dropped it (done)
                self._waiters.remove(waiter)
            raise

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter: ``used`` unchanged
                return
        self.used -= 1
