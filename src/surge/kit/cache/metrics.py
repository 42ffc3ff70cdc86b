"""Prometheus metrics of ``surge.kit.cache`` (multiprocess-safe, bounded labels).

Labels are the cache *name* (a handful per process, never a key) and a fixed vocabulary
(tier ``l1``/``l2``, outcome, reason), so cardinality stays bounded however many keys exist.
Hits and misses on the hot path are counted in plain ints and flushed here about once a
second (``Cache._flush_metrics``): a prometheus ``inc()`` takes a lock and, in multiprocess
mode, writes an mmap — more than the whole L1 hit costs (~0.4 µs, ``bench/cache.py``).

Hit ratio in PromQL::

    sum(rate(cache_hits_total[5m])) by (cache)
      / (sum(rate(cache_hits_total{tier="l1"}[5m])) by (cache)
         + sum(rate(cache_misses_total{tier="l1"}[5m])) by (cache))

``cache_hit_ratio`` gives the same per process since start (``liveall``: one series per pid).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from surge.kit.telemetry.metrics import LATENCY_BUCKETS

HITS = Counter("cache_hits_total", "Cache hits by tier (l1, l2).", ["cache", "tier"])
MISSES = Counter("cache_misses_total", "Cache misses by tier (l1, l2).", ["cache", "tier"])
STALE_SERVED = Counter(
    "cache_stale_served_total",
    "Stale values served, by reason (revalidate: refresh running; error: loader failed).",
    ["cache", "reason"],
)
EARLY_REFRESHES = Counter(
    "cache_early_refreshes_total",
    "Background refreshes started by a hit shortly before expiry (probabilistic early refresh).",
    ["cache"],
)
LOADS = Counter("cache_loads_total", "Loader calls by outcome (ok, error).", ["cache", "outcome"])
LOAD_SECONDS = Histogram(
    "cache_load_seconds", "Loader latency.", ["cache"], buckets=LATENCY_BUCKETS
)
LEASE_WAITS = Counter(
    "cache_lease_waits_total",
    "Misses that waited for another process's load (cross-process single-flight).",
    ["cache"],
)
EVICTIONS = Counter("cache_evictions_total", "L1 entries evicted by the size bound.", ["cache"])
INVALIDATIONS = Counter(
    "cache_invalidations_total", "Invalidations sent, by kind (key, tag, clear).", ["cache", "kind"]
)
INVALIDATIONS_DEFERRED = Counter(
    "cache_invalidations_deferred_total",
    "Invalidations that did not reach Redis when made (outage, busy pool, error reply): "
    "queued, replayed on recovery and every resync interval while Redis is up.",
    ["cache"],
)
L2_ERRORS = Counter(
    "cache_l2_errors_total", "Redis operations that failed or were skipped (Redis down).", ["cache"]
)
OVERSIZE = Counter(
    "cache_oversize_total", "Values over CACHE_MAX_VALUE_BYTES, kept in L1 only.", ["cache"]
)
RESYNCS = Counter(
    "cache_resyncs_total",
    "L1 flushes because invalidation messages may have been lost (gap, reconnect).",
    ["cache", "reason"],
)
L1_ENTRIES = Gauge(
    "cache_l1_entries",
    "Entries in the L1 (process memory).",
    ["cache"],
    multiprocess_mode="livesum",
)
HIT_RATIO = Gauge(
    "cache_hit_ratio",
    "Hits (any tier) / lookups since the process started.",
    ["cache"],
    multiprocess_mode="liveall",
)
DEGRADED = Gauge(
    "cache_degraded",
    "1 while this process serves from L1 + loader only (Redis unreachable).",
    ["cache"],
    multiprocess_mode="livemax",
)
