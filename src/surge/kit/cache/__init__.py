"""A tiered cache: process LRU (L1) → Redis (L2) → loader, that never stampedes and survives
Redis loss. One ``Cache`` per process, built by the runtime: ``runtime.cache``.

    CacheError                  the cache's own errors (a loader's errors pass through as is)
    ├── RecursiveLoad           a loader asked for the key it is loading
    └── ValueNotCacheable       (also a TypeError) the value is not a msgpack type

Redis failures are never raised to callers: an outage or an error reply (OOM, WRONGTYPE)
makes that call skip L2, counted in ``cache_l2_errors_total``.

Public API (stable)::

    value = await cache.get_or_load("user:42:limits", load_limits, ttl=300, tags=["user:42"])
    result = await cache.fetch(key, loader)          # CacheResult(value, stale, source)
    await cache.get(key, default=None)               # fresh value from L1/L2, never loads
    await cache.set(key, value, ttl=..., tags=[...])
    await cache.delete(*keys)                        # L1 here + L2 + L1 everywhere (pub/sub)
    await cache.invalidate_tags(*tags)               # O(1) per tag: version bump
    await cache.clear()                              # O(1): namespace version bump
    await cache.warm(keys, batch_loader)             # batch_loader(keys) -> {key: value}
    cache.invalidate_on_commit(session, keys=[...], tags=[...])  # after the DB commit only
    cache.stats()

Semantics, in the order a read meets them:

- **L1** holds decoded values (treat them as immutable: callers share the object), bounded by
  entry count (``CACHE_L1_MAX_ENTRIES``, seed 003: 50 000) with per-entry TTL. L1 trusts an
  entry at most ``CACHE_L1_TTL`` (jittered like the TTL) before asking L2 again.
- **L2** is Redis: msgpack envelopes ``[format, fresh_until, stale_until, tags, tag_versions,
  value]`` under ``{namespace}:{version}:{key}``, with a physical TTL of TTL + max stale.
  TTLs get up to ``CACHE_TTL_JITTER`` shaved off (never added) so a batch written together
  does not expire together. Values must be msgpack types (dict, list, str, int, float, bool,
  None, bytes); tuples come back as lists in every process, the writer's included. Values over
  ``CACHE_MAX_VALUE_BYTES`` stay in the writer's L1 only.
- **Single-flight**: concurrent misses of a key in one process share one loader call; across
  processes a Redis lease (``SET NX PX``) lets one process load while the others poll L2 for
  at most ``CACHE_LEASE``. A delete kills the lease, so a load that raced an invalidation
  never writes its old value back (Facebook's memcache leases). A loader runs inside
  ``kit.db.primary_reads()``: a fill that starts after an invalidation reads the primary,
  never a replica that has not replayed the invalidating write yet (ADR 0060).
- **Early refresh**: in the last ``CACHE_EARLY_REFRESH`` of its TTL, a hit starts one
  background refresh with a probability rising to 1 at expiry (``refresh_early``): hot
  entries are renewed before anyone sees them expire, and a batch written together
  refreshes over that window instead of as one wave (issue 19, ADR 0015).
- **Stale-while-revalidate**: up to ``CACHE_STALE_WHILE_REVALIDATE`` past its TTL an entry is
  served (``stale=True``) while one background refresh runs. **Stale-if-error**: up to
  ``CACHE_MAX_STALE`` past its TTL, a failing loader is answered with the stale value and
  not retried for ``CACHE_FAIL_SAFE_THROTTLE``. An invalidated entry is never served.
- **Invalidation** by key, by tag (a version counter per tag; entries carry the versions they
  were built on) and ``clear`` (namespace version). Every invalidation is one Lua call that
  also increments a sequence number and publishes it; each process's listener drops its L1
  copies, and a resync loop that sees a sequence number it never received (a lost message, a
  reconnect) flushes L1: staleness after a lost message is bounded by ~2 ×
  ``CACHE_RESYNC_INTERVAL``, not by the TTL.
- **Redis down**: ``RedisGateway`` answers "down" without I/O, so L2 is skipped at no cost;
  callers get L1 and the loader, one ``cache.degraded`` log line, ``cache_degraded`` = 1.
  Invalidations made meanwhile are replayed on recovery (past 10 000, one ``clear``), and the
  listener flushes L1 when it reconnects.

Metrics (``surge.kit.cache.metrics``): hits/misses per tier, hit ratio, loads and load
latency, stale serves, lease waits, evictions, L1 size, invalidations, resyncs, degraded.
Design and measurements: ``docs/adr/0005-tiered-cache.md``, ``bench/cache.py``.
"""

from __future__ import annotations

from surge.config import Settings
from surge.kit.cache._base import (
    BatchLoader,
    CacheError,
    CacheResult,
    Loader,
    RecursiveLoad,
    ValueNotCacheable,
)
from surge.kit.cache.core import Cache
from surge.kit.redis import RedisGateway

__all__ = [
    "BatchLoader",
    "Cache",
    "CacheError",
    "CacheResult",
    "Loader",
    "RecursiveLoad",
    "ValueNotCacheable",
    "cache_from_settings",
]


def cache_from_settings(
    settings: Settings, gateway: RedisGateway, *, name: str = "default"
) -> Cache:
    """The process cache as ``Settings`` describe it (``CACHE_*``)."""
    return Cache(
        gateway,
        name=name,
        namespace=settings.CACHE_NAMESPACE,
        l1_max_entries=settings.CACHE_L1_MAX_ENTRIES,
        l1_ttl=settings.CACHE_L1_TTL.total_seconds(),
        ttl=settings.CACHE_TTL.total_seconds(),
        ttl_jitter=settings.CACHE_TTL_JITTER,
        early_refresh=settings.CACHE_EARLY_REFRESH,
        stale_while_revalidate=settings.CACHE_STALE_WHILE_REVALIDATE.total_seconds(),
        max_stale=settings.CACHE_MAX_STALE.total_seconds(),
        fail_safe_throttle=settings.CACHE_FAIL_SAFE_THROTTLE.total_seconds(),
        lease=settings.CACHE_LEASE.total_seconds(),
        max_value_bytes=settings.CACHE_MAX_VALUE_BYTES,
        resync_interval=settings.CACHE_RESYNC_INTERVAL.total_seconds(),
    )
