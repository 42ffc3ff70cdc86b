"""Prometheus metrics shared by every kit package.

Correct across several processes: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``surge up`` and
``surge serve`` set it before any worker starts) each process writes its samples to mmap files
in that folder and ``/metrics`` aggregates them; gauges declare how (``livesum``: add the live
processes, ``liveall``: one series per pid). Without it, the default registry is used.
"""

from __future__ import annotations

import os
import shutil
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Latency buckets: fine below 100 ms where an API lives, coarse above.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests by route template and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "HTTP request duration by route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(
    "http_requests_in_flight", "Requests being served.", multiprocess_mode="livesum"
)

DB_POOL_SIZE = Gauge(
    "db_pool_connections", "Open pooled DB connections.", ["pool"], multiprocess_mode="livesum"
)
DB_POOL_CHECKED_OUT = Gauge(
    "db_pool_checked_out", "DB connections in use.", ["pool"], multiprocess_mode="livesum"
)
DB_POOL_WAITING = Gauge(
    "db_pool_waiting", "Callers waiting for a DB connection.", ["pool"], multiprocess_mode="livesum"
)
DB_SLOW_QUERIES = Counter("db_slow_queries_total", "Queries slower than DB_SLOW_QUERY.", ["pool"])
DB_EXPECTED_SLOW_QUERIES = Counter(
    "db_expected_slow_queries_total",
    "Queries slower than DB_SLOW_QUERY inside a labelled expected-slow phase (kit.db.phase).",
    ["pool", "phase"],
)
DB_QUERY_MAX = Gauge(
    "db_query_max_seconds", "Slowest query seen (per process).", multiprocess_mode="livemax"
)
DB_ON_COMMIT_FAILURES = Counter(
    "db_on_commit_failures_total",
    "Callbacks run after a commit (on_commit) that raised: the write stands, a side effect failed.",
)
DB_REPLICA_FALLBACKS = Counter(
    "db_replica_fallbacks_total", "Read sessions sent to the primary because a replica failed."
)
DB_REPLICA_LAG = Gauge(
    "db_replica_lag_bytes",
    "WAL bytes a replica has not replayed yet (-1: not answering); past DB_REPLICA_MAX_LAG it "
    "gets no reads (issue 18).",
    ["replica"],
    multiprocess_mode="livemax",
)

REDIS_UP = Gauge("redis_up", "1 while this process can reach Redis.", multiprocess_mode="livemin")

PROCESS_MEMORY = Gauge(
    "surge_process_resident_memory_bytes", "RSS per process.", multiprocess_mode="liveall"
)
PROCESS_MEMORY_PERCENT = Gauge(
    "surge_system_memory_used_ratio", "Machine memory in use (0-1).", multiprocess_mode="livemax"
)

_process = psutil.Process()


class RequestRecorder:
    """Per-request RED metrics batched in process memory, flushed to Prometheus every second.

    In multiprocess mode every ``inc``/``observe`` is a locked write into an mmap file: five of
    them per request cost ~15 µs, a third of a bare FastAPI request (bench ``ping``). Here a
    request costs one dict lookup and two list updates; ``flush()`` (every second, and before
    each ``/metrics`` render in this process) adds the batched counts in one write per series.
    ``/metrics`` may therefore lag by up to a second for the *other* processes.

    ``route`` is the route *object* the request matched (anything with a ``path`` template:
    a Starlette route, FastAPI's effective route context of an included router), a template
    string, or ``None`` (unmatched). Series are keyed by its identity and the template is
    read at flush, not per request (ADR 0056); a series holds its route until the flush, so
    an identity cannot be reused meanwhile.
    """

    __slots__ = ("_bounds", "_in_flight", "_series")

    def __init__(self) -> None:
        self._bounds = LATENCY_BUCKETS
        # (method, id(route), status) -> [route, sum, n_bucket_0, ..., n_bucket_k, n_over]
        self._series: dict[tuple[str, int, int], list[Any]] = {}
        self._in_flight = 0

    def started(self) -> None:
        self._in_flight += 1

    def finished(self, method: str, route: object, status: int, seconds: float) -> None:
        self._in_flight -= 1
        key = (method, id(route), status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [route, 0.0, *([0] * (len(self._bounds) + 1))]
        series[1] += seconds
        # The first bound ≥ seconds (``le`` semantics), or the slot after the last bound.
        series[bisect_left(self._bounds, seconds) + 2] += 1

    def untimed(self) -> None:
        """A request that is not recorded (a stream) has ended: it is no longer in flight."""
        self._in_flight -= 1

    def flush(self) -> None:
        series, self._series = self._series, {}
        histograms: dict[tuple[str, str], list[float]] = {}
        for (method, _, status), values in series.items():
            route = template(values[0])
            HTTP_REQUESTS.labels(method, route, str(status)).inc(sum(values[2:]))
            histogram = histograms.get((method, route))
            if histogram is None:
                histograms[(method, route)] = values[1:]
            else:  # the same template under another status (or another route object)
                for index, value in enumerate(values[1:]):
                    histogram[index] += value
        for (method, route), values in histograms.items():
            child = HTTP_DURATION.labels(method, route)
            buckets = getattr(child, "_buckets", None)
            total = getattr(child, "_sum", None)
            if buckets is None or total is None:  # pragma: no cover - prometheus_client changed
                raise RuntimeError("prometheus_client Histogram internals changed; pin the version")
            total.inc(values[0])
            for index, observed in enumerate(values[1:-1]):
                if observed:
                    buckets[index].inc(observed)
            if values[-1]:
                buckets[-1].inc(values[-1])  # the +Inf bucket
        HTTP_IN_FLIGHT.set(self._in_flight)


#: The ``route`` label of a request that matched no route.
UNMATCHED = "<unmatched>"


def template(route: object) -> str:
    """A recorded route's label: a template string as given, else the object's ``path``."""
    if isinstance(route, str):
        return route
    return str(getattr(route, "path", None) or UNMATCHED)


REQUESTS = RequestRecorder()

#: Other batched recorders (breakers...) register here; ``flush_all()`` empties them all.
_FLUSHERS: list[Callable[[], None]] = [REQUESTS.flush]


class BatchedCounter:
    """A labelled ``Counter`` for hot paths: ``labels(...).inc()`` adds to a Python int, and
    the sums reach Prometheus once per flush (every second, and before every read), as for
    ``RequestRecorder`` — in multiprocess mode each real ``inc`` is a locked mmap write and
    a ``getpid`` (~3 µs a call on the bench machine; ADR 0012)."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self._children: dict[tuple[str, ...], _BatchedChild] = {}
        on_flush(self.flush)

    def labels(self, *values: str) -> _BatchedChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _BatchedChild(self.counter.labels(*values))
        return child

    def flush(self) -> None:
        for child in self._children.values():
            pending = child.pending
            if pending:
                child.pending = 0
                child.target.inc(pending)


class _BatchedChild:
    __slots__ = ("pending", "target")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.pending = 0

    def inc(self, amount: int = 1) -> None:
        self.pending += amount


class BatchedHistogram:
    """An unlabelled ``Histogram`` for hot paths: ``observe`` adds to Python numbers, and
    the sums reach Prometheus once per flush, written into the histogram's per-bucket
    values as ``RequestRecorder.flush`` does (one write per bucket that moved, not two
    locked mmap writes per observation)."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self._bounds = tuple(float(b) for b in histogram._upper_bounds if b != float("inf"))
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every finite bound
        self._sum = 0.0
        on_flush(self.flush)

    def observe(self, value: float) -> None:
        self._sum += value
        self._counts[bisect_left(self._bounds, value)] += 1

    def flush(self) -> None:
        counts, self._counts = self._counts, [0] * len(self._counts)
        total, self._sum = self._sum, 0.0
        if not any(counts):
            return
        buckets = getattr(self.histogram, "_buckets", None)
        observed = getattr(self.histogram, "_sum", None)
        if buckets is None or observed is None:  # pragma: no cover - prometheus_client changed
            raise RuntimeError("prometheus_client Histogram internals changed; pin the version")
        observed.inc(total)
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)


def on_flush(flusher: Callable[[], None]) -> None:
    """Register a batched recorder's flush, run before every read of the registry."""
    _FLUSHERS.append(flusher)


def flush_all() -> None:
    """Push every batched count into Prometheus (before ``/metrics``, alerts, admin reads)."""
    for flusher in _FLUSHERS:
        flusher()


def sample_process() -> None:
    """Refresh the process gauges (called every few seconds by each process)."""
    PROCESS_MEMORY.set(_process.memory_info().rss)
    PROCESS_MEMORY_PERCENT.set(psutil.virtual_memory().percent / 100.0)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir(path: Path) -> None:
    """Empty the folder before the processes start (stale files would be summed in)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)


def mark_process_dead(pid: int) -> None:
    if multiprocess_dir():
        prom_multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def render() -> tuple[bytes, str]:
    """The exposition text for ``GET /metrics``, aggregated over processes when needed."""
    flush_all()
    if multiprocess_dir():
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
