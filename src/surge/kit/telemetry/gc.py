"""The garbage collector of a long-running server process: its thresholds, and its time.

A web process holds large, long-lived caches (tens of thousands of memory-tier entries,
verified tokens, built answers), refilled all the time under load. With CPython's default
thresholds (700, 10, 10) a young collection runs every few requests and promotes whatever the
requests in flight hold; the old generation fills with them and with fresh cache entries, and
a *full* collection — a walk over every tracked object of the process, 160-460 ms on the bench
machine — runs every few seconds. Each is a stall of the whole event loop (every in-flight
request waits), and under load the collector took 12-22 % of a web process's CPU (ADR 0041).

``tune(thresholds)`` sets the thresholds once the process has started (``gc.freeze()`` has
already moved the start-up heap out of sight); ``GC_SECONDS`` counts the time each generation
took, so ``/metrics`` shows what the collector costs instead of it hiding in whatever line
allocated when a collection started.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter

from surge.kit.telemetry.metrics import BatchedCounter, on_flush

GC_SECONDS = Counter(
    "process_gc_seconds_total",
    "Time the garbage collector ran in this process, by generation collected.",
    ["generation"],
)
GC_COLLECTIONS = Counter(
    "process_gc_collections_total",
    "Garbage collections in this process, by generation collected.",
    ["generation"],
)
_COLLECTIONS = BatchedCounter(GC_COLLECTIONS)


class _Timer:
    """A ``gc.callbacks`` entry: the time between each collection's start and stop."""

    def __init__(self) -> None:
        self.started = 0.0
        self.collections = [_COLLECTIONS.labels(str(g)) for g in range(3)]
        #: Seconds by generation, written to ``GC_SECONDS`` at each metrics flush.
        self.totals = [0.0, 0.0, 0.0]
        self._flushed = [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        generation = int(info["generation"])
        self.totals[generation] += time.perf_counter() - self.started
        self.collections[generation].inc()

    def flush(self) -> None:
        for generation in range(3):
            delta = self.totals[generation] - self._flushed[generation]
            if delta > 0:
                self._flushed[generation] = self.totals[generation]
                GC_SECONDS.labels(str(generation)).inc(delta)


_timer: _Timer | None = None


def tune(thresholds: Sequence[int]) -> None:
    """``gc.set_threshold(*thresholds)`` (an empty sequence keeps Python's), and count the
    collector's time in ``process_gc_seconds_total`` from now on (once per process)."""
    global _timer
    if thresholds:
        gc.set_threshold(*thresholds)
    if _timer is None:
        _timer = _Timer()
        gc.callbacks.append(_timer)
        on_flush(_timer.flush)


def seconds_by_generation() -> list[float]:
    """The collector's time in this process since ``tune`` (tests, diagnostics)."""
    return list(_timer.totals) if _timer is not None else [0.0, 0.0, 0.0]
