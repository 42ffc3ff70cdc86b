"""Sliding windows of call outcomes: count-based (a ring buffer) and time-based (one bucket
per second). O(1) record and read, no I/O, no lock."""

from __future__ import annotations

# Outcome codes packed in one small int: bit 0 = failed, bit 1 = slow.
_FAIL = 1
_SLOW = 2


class _CountWindow:
    """The last ``size`` outcomes in a ring buffer with running totals: O(1) record and read."""

    __slots__ = ("calls", "failures", "index", "ring", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring: list[int] = []
        self.index = 0
        self.calls = self.failures = self.slow = 0

    def record(self, outcome: int, now: float) -> None:
        ring = self.ring
        if len(ring) < self.size:
            ring.append(outcome)
            self.calls += 1
        else:
            old = ring[self.index]
            ring[self.index] = outcome
            self.index = (self.index + 1) % self.size
            self.failures -= old & _FAIL
            self.slow -= (old & _SLOW) >> 1
        self.failures += outcome & _FAIL
        self.slow += (outcome & _SLOW) >> 1

    def record_ok(self, now: float) -> None:
        """The common case, a fast success, with the fewest operations (hot path)."""
        if self.calls < self.size:
            self.ring.append(0)
            self.calls += 1
            return
        index = self.index
        old = self.ring[index]
        if old:
            self.ring[index] = 0
            self.failures -= old & _FAIL
            self.slow -= (old & _SLOW) >> 1
        index += 1
        self.index = 0 if index == self.size else index

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.calls, self.failures, self.slow

    def clear(self) -> None:
        self.ring.clear()
        self.index = 0
        self.calls = self.failures = self.slow = 0


class _TimeWindow:
    """Calls of the last ``size`` seconds in one bucket per second (resilience4j TIME_BASED)."""

    __slots__ = ("buckets", "calls", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        # epoch second -> [calls, failures, slow]
        self.buckets: dict[int, list[int]] = {}
        self.calls = self.failures = self.slow = 0

    def _expire(self, now: float) -> None:
        oldest = int(now) - self.size + 1
        for second in [s for s in self.buckets if s < oldest]:
            calls, failures, slow = self.buckets.pop(second)
            self.calls -= calls
            self.failures -= failures
            self.slow -= slow

    def record(self, outcome: int, now: float) -> None:
        second = int(now)
        bucket = self.buckets.get(second)
        if bucket is None:
            self._expire(now)
            bucket = self.buckets[second] = [0, 0, 0]
        failed, slow = outcome & _FAIL, (outcome & _SLOW) >> 1
        bucket[0] += 1
        bucket[1] += failed
        bucket[2] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def record_ok(self, now: float) -> None:
        bucket = self.buckets.get(int(now))
        if bucket is None:
            self.record(0, now)
            return
        bucket[0] += 1
        self.calls += 1

    def totals(self, now: float) -> tuple[int, int, int]:
        self._expire(now)
        return self.calls, self.failures, self.slow

    def clear(self) -> None:
        self.buckets.clear()
        self.calls = self.failures = self.slow = 0
