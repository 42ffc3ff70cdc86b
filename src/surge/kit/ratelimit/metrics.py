"""Rate-limit metrics: decisions by policy, outcome and store; local-fallback state.

Decisions and batch sizes are recorded on every Redis round trip of the limiter: they go
through the batched recorders (``DECISIONS_BATCHED``, ``BATCH_SIZES``), which reach
Prometheus once a second and before every read (``metrics.flush_all``), instead of locked
mmap writes per batch in multiprocess mode (ADR 0023)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from surge.kit.telemetry.metrics import BatchedCounter, BatchedHistogram

DECISIONS = Counter(
    "ratelimit_decisions_total",
    "Rate-limit verdicts by policy, outcome (allowed, denied, shadow_denied) and store "
    "(redis, lease, local, open, closed).",
    ["policy", "outcome", "store"],
)
LOCAL_FALLBACK = Gauge(
    "ratelimit_local_fallback",
    "1 while this process limits from memory because Redis is unreachable.",
    multiprocess_mode="livemax",
)
BATCH_SIZE = Histogram(
    "ratelimit_batch_decisions",
    "Decisions carried by one Redis round trip (concurrent decisions of a process share one).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)

DECISIONS_BATCHED = BatchedCounter(DECISIONS)
BATCH_SIZES = BatchedHistogram(BATCH_SIZE)
