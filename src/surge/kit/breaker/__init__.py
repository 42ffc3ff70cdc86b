"""Circuit breakers with resilience4j's semantics, native asyncio, metrics and fleet-wide opening.

    SurgeError
    └── ServiceUnavailable              503 + Retry-After
        └── DependencyUnavailable
            └── UpstreamError           something Surge calls out to failed
                └── BreakerOpenError    the breaker refused the call without trying it

A ``Breaker`` is CLOSED (calls pass and are recorded in a sliding window), OPEN (calls are
refused at once with ``BreakerOpenError``) or HALF_OPEN (at most ``half_open_calls`` trial
calls pass; if their failure rate and slow-call rate stay under the thresholds the breaker
closes, otherwise it opens again). The window is *count-based* (the last N calls, a ring
buffer) or *time-based* (the calls of the last N seconds, one bucket per second), and the
breaker only judges once ``minimum_calls`` are in it, so 2 failures out of 2 calls do not trip
it. Slow calls (longer than ``slow_call_duration``) have their own rate threshold: latency often
degrades before errors appear. Which exceptions count is ``record`` / ``ignore``; an ignored
exception passes through and is not recorded at all (a 404 is not an outage).

The hot path does no I/O and takes no lock (asyncio is single-threaded): two clock reads and
a few integer updates. ``surge bench breaker`` measures it against pybreaker and purgatory.

Fleet-wide state (``BreakerFleet``): each process keeps its own window and decides alone.
When one trips, it records itself in a Redis sorted set per breaker; when at least
``quorum`` live processes are open (1 by default: any process opening opens all), it
publishes an ``open`` event with the remaining open time and every process subscribed opens
too, for that long. A process started later (or reconnected) reads the current fleet state
once. When Redis is down, ``RedisGateway`` raises ``RedisUnavailable`` at once and each
process simply keeps its own breaker: no call ever waits for Redis. Why a quorum and not a
shared counter: one sick process (bad DNS, exhausted pool) must not trip the fleet on its own
unless you want it to (Polly#287).

The package: ``core`` (configuration, ``Breaker``, the registry), ``_windows`` (the sliding
windows), ``fleet`` (fleet-wide opening through Redis), ``metrics`` (Prometheus series) and
``web`` (the admin router). Import from ``surge.kit.breaker``.
"""

from __future__ import annotations

from surge.kit.breaker.core import (
    Breaker,
    BreakerConfig,
    BreakerOpenError,
    BreakerRegistry,
    BreakerState,
    Fallback,
    Listener,
    UpstreamError,
    WindowType,
    breakers,
    flush_all_metrics,
)
from surge.kit.breaker.fleet import BreakerFleet, start_breakers
from surge.kit.breaker.web import breaker_router

__all__ = [
    "Breaker",
    "BreakerConfig",
    "BreakerFleet",
    "BreakerOpenError",
    "BreakerRegistry",
    "BreakerState",
    "Fallback",
    "Listener",
    "UpstreamError",
    "WindowType",
    "breaker_router",
    "breakers",
    "flush_all_metrics",
    "start_breakers",
]
