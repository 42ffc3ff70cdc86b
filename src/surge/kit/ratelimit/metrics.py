"""Rate-limit metrics: decisions by policy, outcome and store; local-fallback state."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter(
    "ratelimit_decisions_total",
    "Rate-limit verdicts by policy, outcome (allowed, denied, shadow_denied) and store "
    "(redis, local, open, closed).",
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
