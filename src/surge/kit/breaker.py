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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import structlog
from fastapi import APIRouter, params
from prometheus_client import Counter, Gauge

from surge.kit.errors import DependencyUnavailable, NotFound
from surge.kit.telemetry import metrics as telemetry_metrics

if TYPE_CHECKING:
    from surge.config import Settings
    from surge.kit.redis import RedisGateway

log = structlog.get_logger()

P = ParamSpec("P")
T = TypeVar("T")

BREAKER_STATE = Gauge(
    "breaker_state",
    "Circuit breaker state: 0 closed, 1 half-open, 2 open (worst process wins).",
    ["breaker"],
    multiprocess_mode="livemax",
)
BREAKER_CALLS = Counter(
    "breaker_calls_total",
    "Calls through a breaker by outcome: success, failure, slow_success, slow_failure, "
    "rejected, ignored.",
    ["breaker", "outcome"],
)
BREAKER_TRANSITIONS = Counter(
    "breaker_transitions_total", "State changes of a breaker.", ["breaker", "from_state", "to"]
)

_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class UpstreamError(DependencyUnavailable):
    """Something Surge calls out to (a provider, a webhook, a proxy) failed or is refused."""


class BreakerOpenError(UpstreamError):
    """The breaker is open: the call was not attempted. ``retry_after`` is when it may be."""

    status_code = 503
    title = "Service Unavailable"

    def __init__(self, name: str, retry_after: float) -> None:
        # Built on the fail-fast path of every refused call, so the SurgeError fields are set
        # directly: the generic constructor chain copied three dicts and doubled the cost.
        # A forced-open breaker has no end: tell clients to come back in a minute.
        retry_after = retry_after if retry_after < 86400 else 60.0
        message = f"circuit breaker {name!r} is open"
        Exception.__init__(self, message)
        self.message = message
        self.headers = {"Retry-After": str(max(1, int(retry_after + 0.999)))}
        self.extra = {"breaker": name}
        self.breaker = name
        self.retry_after = retry_after


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class WindowType(StrEnum):
    COUNT = "count"
    TIME = "time"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """How a breaker judges. Defaults follow resilience4j, scaled down for one service:
    resilience4j's minimumNumberOfCalls=100 never trips a service that makes 20 calls a minute."""

    failure_rate: float = 0.5
    """Open when this share of the window's calls failed (0-1)."""
    slow_call_rate: float = 1.0
    """Open when this share of the window's calls were slow (1.0 = only if all are)."""
    slow_call_duration: float = 5.0
    """Seconds; a call longer than this is slow (even when it succeeds)."""
    window_type: WindowType = WindowType.COUNT
    window_size: int = 50
    """Calls (COUNT) or seconds (TIME) in the sliding window."""
    minimum_calls: int = 10
    """No judgement before the window holds this many calls."""
    open_duration: float = 30.0
    """Seconds OPEN before trial calls are let through (HALF_OPEN)."""
    half_open_calls: int = 3
    """Trial calls in HALF_OPEN; their outcome alone decides to close or reopen."""
    record: tuple[type[BaseException], ...] = (Exception,)
    """Exceptions that count as failures."""
    ignore: tuple[type[BaseException], ...] = ()
    """Exceptions that pass through unrecorded (checked before ``record``)."""

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate <= 1 or not 0 < self.slow_call_rate <= 1:
            raise ValueError("failure_rate and slow_call_rate must be in (0, 1]")
        if self.window_size < 1 or self.minimum_calls < 1 or self.half_open_calls < 1:
            raise ValueError("window_size, minimum_calls and half_open_calls must be >= 1")


# ---- sliding windows ----------------------------------------------------------------------
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


Listener = Callable[["Breaker", BreakerState, BreakerState], None]
Fallback = Callable[[BaseException], Awaitable[Any]]


class Breaker:
    """One named circuit breaker. Use ``await breaker.call(fn, *args)``, ``@breaker`` on an
    async function, or ``async with breaker.guard():`` around a block.

    ``clock`` is injectable (monotonic seconds) so tests drive time instead of sleeping."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        fallback: Fallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config = config or BreakerConfig()
        self.fallback = fallback
        self._clock = clock
        self._window: _CountWindow | _TimeWindow = (
            _CountWindow(config.window_size)
            if config.window_type is WindowType.COUNT
            else _TimeWindow(config.window_size)
        )
        self._state = BreakerState.CLOSED
        self._open_until = 0.0
        self._trial_permits = 0
        self._trial_done = 0
        self._trial_failures = 0
        self._trial_slow = 0
        self._forced: BreakerState | None = None
        self._listeners: list[Listener] = []
        self.last_error: str | None = None
        self.opened_at: float | None = None
        # Pre-bound metric children: labels() costs ~1 µs, inc() on a child ~0.2 µs.
        self._m_ok = BREAKER_CALLS.labels(name, "success")
        self._m_fail = BREAKER_CALLS.labels(name, "failure")
        self._m_slow_ok = BREAKER_CALLS.labels(name, "slow_success")
        self._m_slow_fail = BREAKER_CALLS.labels(name, "slow_failure")
        self._m_rejected = BREAKER_CALLS.labels(name, "rejected")
        self._m_ignored = BREAKER_CALLS.labels(name, "ignored")
        self._m_state = BREAKER_STATE.labels(name)
        self._m_state.set(0)
        # Fast successes and rejections reach the counters in batches (every 64 calls, every
        # other outcome, status(), alert snapshots, and each second from the fleet loop):
        # one inc() costs ~0.28 µs, a quarter of the closed-path overhead (`surge bench breaker`).
        self._ok_pending = 0
        self._rejected_pending = 0
        self._slow_s = config.slow_call_duration

    # ---- state ----------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """The current state, moving OPEN → HALF_OPEN when the open time is over."""
        if (
            self._state is BreakerState.OPEN
            and self._forced is None
            and self._clock() >= self._open_until
        ):
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    def add_listener(self, listener: Listener) -> None:
        """``listener(breaker, old, new)`` on every transition (events: logs, fleet sync)."""
        self._listeners.append(listener)

    def _transition(self, new: BreakerState, *, reason: str = "", notify: bool = True) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        if new is BreakerState.OPEN:
            self.opened_at = self._clock()
        elif new is BreakerState.HALF_OPEN:
            self._trial_permits = self.config.half_open_calls
            self._trial_done = self._trial_failures = self._trial_slow = 0
        else:
            self._window.clear()
            self.opened_at = None
        self._m_state.set(_STATE_VALUE[new])
        BREAKER_TRANSITIONS.labels(self.name, old.value, new.value).inc()
        log.warning(
            "breaker.state_changed",
            breaker=self.name,
            from_state=old.value,
            to=new.value,
            reason=reason,
            last_error=self.last_error,
        )
        if notify:
            for listener in self._listeners:
                try:
                    listener(self, old, new)
                except Exception:  # a listener never breaks the caller's call
                    log.exception("breaker.listener_failed", breaker=self.name)

    def _open(self, duration: float, *, reason: str, notify: bool = True) -> None:
        self._open_until = self._clock() + duration
        self._transition(BreakerState.OPEN, reason=reason, notify=notify)

    def remaining_open(self) -> float:
        """Seconds until trial calls are let through (0 unless OPEN)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    # ---- manual control (admin endpoints) --------------------------------------------------
    def reset(self) -> None:
        """Back to CLOSED with an empty window (admin "reset"); clears a forced state."""
        self._forced = None
        self._transition(BreakerState.CLOSED, reason="reset")
        self._window.clear()

    def force_open(self) -> None:
        """Hold the breaker OPEN until ``reset()`` (maintenance of a dependency)."""
        self._forced = BreakerState.OPEN
        self._open(float("inf"), reason="forced")

    def open_for(self, duration: float, *, reason: str) -> None:
        """Open for ``duration`` seconds without telling listeners (fleet-wide opening)."""
        if self._forced is not None:
            return
        if self._state is BreakerState.OPEN and self._open_until >= self._clock() + duration:
            return
        self._open(duration, reason=reason, notify=False)

    # ---- the call path --------------------------------------------------------------------
    def _acquire(self) -> bool:
        """Permit a call or raise ``BreakerOpenError``. True when it is a half-open trial."""
        state = self._state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.OPEN:
            remaining = self._open_until - self._clock()
            if remaining > 0 or self._forced is not None:
                self._rejected_pending += 1
                if self._rejected_pending >= 64:
                    self.flush_metrics()
                raise BreakerOpenError(self.name, remaining)
            self._transition(BreakerState.HALF_OPEN)
        if self._trial_permits <= 0:
            self._rejected_pending += 1
            raise BreakerOpenError(self.name, 1.0)
        self._trial_permits -= 1
        return True

    def _record(self, failed: bool, elapsed: float, trial: bool) -> None:
        config = self.config
        slow = elapsed > config.slow_call_duration
        self.flush_metrics()
        if failed:
            (self._m_slow_fail if slow else self._m_fail).inc()
        else:
            (self._m_slow_ok if slow else self._m_ok).inc()
        if trial:
            if self._state is not BreakerState.HALF_OPEN:
                return  # reset or re-opened meanwhile: the trial no longer decides
            self._trial_done += 1
            self._trial_failures += failed
            self._trial_slow += slow
            if self._trial_done >= config.half_open_calls:
                done = self._trial_done
                if (
                    self._trial_failures / done >= config.failure_rate
                    or self._trial_slow / done >= config.slow_call_rate
                ):
                    self._open(config.open_duration, reason="half_open_trials_failed")
                else:
                    self._transition(BreakerState.CLOSED, reason="half_open_trials_passed")
            return
        if self._state is not BreakerState.CLOSED:
            return  # a call that started before the breaker opened
        now = self._clock()
        window = self._window
        window.record((_FAIL if failed else 0) | (_SLOW if slow else 0), now)
        if not (failed or slow):
            return  # success cannot raise a rate: skip the judgement
        calls, failures, slow_calls = window.totals(now)
        if calls < config.minimum_calls:
            return
        if failures / calls >= config.failure_rate:
            self._open(config.open_duration, reason=f"failure_rate {failures}/{calls} calls failed")
        elif slow_calls / calls >= config.slow_call_rate:
            self._open(config.open_duration, reason=f"slow_call_rate {slow_calls}/{calls} slow")

    def _counts(self, exc: BaseException) -> bool:
        config = self.config
        if config.ignore and isinstance(exc, config.ignore):
            return False
        return isinstance(exc, config.record)

    def flush_metrics(self) -> None:
        """Push the batched success and rejection counts to Prometheus (every 64 calls, on any
        other outcome, on ``status()``, each second from the fleet loop, and by
        ``flush_all_metrics()`` before an alert evaluation)."""
        if self._ok_pending:
            self._m_ok.inc(self._ok_pending)
            self._ok_pending = 0
        if self._rejected_pending:
            self._m_rejected.inc(self._rejected_pending)
            self._rejected_pending = 0

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` through the breaker."""
        trial = False
        if self._state is not BreakerState.CLOSED:
            try:
                trial = self._acquire()
            except BreakerOpenError as exc:
                if self.fallback is not None:
                    result: T = await self.fallback(exc)
                    return result
                raise
        clock = self._clock
        started = clock()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            if isinstance(exc, Exception) and self._counts(exc):
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                self._record(True, clock() - started, trial)
                if self.fallback is not None:
                    fallback_result: T = await self.fallback(exc)
                    return fallback_result
            else:
                self._m_ignored.inc()
                if trial:
                    self._trial_permits += 1  # give the permit back: nothing was learnt
            raise
        elapsed = clock() - started
        if trial or elapsed > self._slow_s or self._state is not BreakerState.CLOSED:
            self._record(False, elapsed, trial)
        else:  # the hot path: a fast success while CLOSED
            self._window.record_ok(started)
            self._ok_pending += 1
            if self._ok_pending >= 64:
                self.flush_metrics()
        return result

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Decorator form: ``@breaker`` on an async function."""

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        wrapper.__name__ = getattr(fn, "__name__", "wrapper")
        wrapper.__doc__ = fn.__doc__
        return wrapper

    def guard(self) -> _Guard:
        """``async with breaker.guard():`` — the block is the call (no fallback here)."""
        return _Guard(self)

    def record_failure(self, error: str, elapsed: float = 0.0) -> None:
        """Record a failure observed outside ``call`` (e.g. a 5xx answer that did not raise)."""
        self.last_error = error[:300]
        self._record(True, elapsed, False)

    # ---- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What the admin endpoint shows for this breaker."""
        self.flush_metrics()
        state = self.state
        calls, failures, slow = self._window.totals(self._clock())
        return {
            "name": self.name,
            "state": state.value,
            "forced": self._forced is not None,
            "window": {"calls": calls, "failures": failures, "slow": slow},
            "failure_rate": round(failures / calls, 4) if calls else 0.0,
            "retry_after_s": round(self.remaining_open(), 3)
            if self.remaining_open() != float("inf")
            else None,
            "last_error": self.last_error,
            "config": {
                key: value
                for key, value in asdict(self.config).items()
                if key not in {"record", "ignore"}
            },
        }


class _Guard:
    """The async context manager behind ``Breaker.guard()`` (a class: 2x cheaper than
    ``@asynccontextmanager``'s generator)."""

    __slots__ = ("breaker", "started", "trial")

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        self.trial = False
        self.started = 0.0

    async def __aenter__(self) -> Breaker:
        breaker = self.breaker
        if breaker._state is not BreakerState.CLOSED:
            self.trial = breaker._acquire()
        self.started = breaker._clock()
        return breaker

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        breaker = self.breaker
        elapsed = breaker._clock() - self.started
        if exc is None:
            if self.trial or elapsed > breaker._slow_s or breaker._state is not BreakerState.CLOSED:
                breaker._record(False, elapsed, self.trial)
            else:
                breaker._window.record_ok(self.started)
                breaker._ok_pending += 1
                if breaker._ok_pending >= 64:
                    breaker.flush_metrics()
        elif isinstance(exc, Exception) and breaker._counts(exc):
            breaker.last_error = f"{type(exc).__name__}: {exc}"[:300]
            breaker._record(True, elapsed, self.trial)
        else:
            breaker._m_ignored.inc()
            if self.trial:
                breaker._trial_permits += 1


@dataclass
class BreakerRegistry:
    """Named breakers (``payments``, ``email``, ``upstream``...) with config profiles.

    ``get(name)`` returns the breaker, creating it from ``profiles[profile or name]`` or the
    default config on first use, so every caller in a process shares one breaker per name."""

    default: BreakerConfig = field(default_factory=BreakerConfig)
    profiles: dict[str, BreakerConfig] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    _breakers: dict[str, Breaker] = field(default_factory=dict)
    _created: list[Callable[[Breaker], None]] = field(default_factory=list)

    def get(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        profile: str | None = None,
        fallback: Fallback | None = None,
    ) -> Breaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            chosen = config or self.profiles.get(profile or name) or self.default
            breaker = Breaker(name, chosen, fallback=fallback, clock=self.clock)
            self._breakers[name] = breaker
            for hook in self._created:
                hook(breaker)
        return breaker

    def on_create(self, hook: Callable[[Breaker], None]) -> None:
        """Run ``hook(breaker)`` for every breaker, existing and future (fleet sync)."""
        self._created.append(hook)
        for breaker in list(self._breakers.values()):
            hook(breaker)

    def __iter__(self) -> Iterator[Breaker]:
        return iter(list(self._breakers.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def names(self) -> list[str]:
        return sorted(self._breakers)

    def status(self) -> list[dict[str, Any]]:
        """Every breaker's status, by name (``GET /api/admin/circuit-breakers``)."""
        return [self._breakers[name].status() for name in self.names()]

    def reset(self, name: str | None = None) -> list[str]:
        """Reset one breaker (or all when ``name`` is None); returns the names reset.
        Raises KeyError for an unknown name."""
        targets = [self._breakers[name]] if name is not None else list(self._breakers.values())
        for breaker in targets:
            breaker.reset()
        return [breaker.name for breaker in targets]

    def configure(self, **changes: Any) -> None:
        """Change the default profile (from settings) for breakers created from now on."""
        self.default = replace(self.default, **changes)


def flush_all_metrics(registry: BreakerRegistry | None = None) -> None:
    """Flush every breaker's batched success count (call before reading the counters)."""
    for breaker in registry if registry is not None else breakers:
        breaker.flush_metrics()


#: The process's registry. Kit and domain code take breakers from here by name.
breakers = BreakerRegistry()
telemetry_metrics.on_flush(flush_all_metrics)


class BreakerFleet:
    """Fleet-wide opening through Redis (see the module docstring). Owned by the runtime:
    ``await fleet.start()`` subscribes, ``await fleet.close()`` stops. While Redis is down
    nothing is published or read and every process keeps its own breakers."""

    CHANNEL = "surge:breaker:events"

    def __init__(
        self,
        registry: BreakerRegistry,
        gateway: RedisGateway,
        *,
        quorum: int = 1,
        prefix: str = "surge:breaker:",
    ) -> None:
        self.registry = registry
        self.gateway = gateway
        self.quorum = max(1, quorum)
        self.prefix = prefix
        #: Unique per process (pid alone repeats across containers).
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False
        self._hooked: set[str] = set()

    async def start(self) -> None:
        self.registry.on_create(self._hook)
        self.gateway.on_change(self._on_redis_change)
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="breaker-fleet")
        await self.sync()

    def _hook(self, breaker: Breaker) -> None:
        if breaker.name not in self._hooked:
            self._hooked.add(breaker.name)
            breaker.add_listener(self._on_transition)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            if self._closed:
                raise RuntimeError("closed")
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # closed, or no loop (sync caller): stay local
            coro.close()
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _on_transition(self, breaker: Breaker, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN and breaker.remaining_open() != float("inf"):
            self._spawn(self._report_open(breaker.name, breaker.remaining_open()))
        elif new is BreakerState.CLOSED and old is not BreakerState.HALF_OPEN:
            # A manual reset: close everywhere. (Closing after trials is each process's own.)
            self._spawn(self._report_reset(breaker.name))

    def _on_redis_change(self, up: bool) -> None:
        if up:
            self._spawn(self._resync())

    async def _resync(self) -> None:
        """Redis is back: announce what opened here meanwhile, then learn what opened there."""
        for name in sorted(self._hooked):
            breaker = self.registry.get(name)
            remaining = breaker.remaining_open()
            if breaker.state is BreakerState.OPEN and 0 < remaining != float("inf"):
                await self._report_open(name, remaining)
        await self.sync()

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}:open"

    async def _report_open(self, name: str, duration: float) -> None:
        """Record this process as open; publish a fleet opening once the quorum is reached."""
        now_ms = int(time.time() * 1000)
        until_ms = now_ms + int(duration * 1000)
        key = self._key(name)
        try:
            async with self.gateway.guard() as redis:
                pipe = redis.pipeline(transaction=True)
                pipe.zremrangebyscore(key, 0, now_ms)
                pipe.zadd(key, {self.origin: until_ms})
                pipe.zcard(key)
                pipe.pexpire(key, int(duration * 1000) + 1000)
                _, _, open_count, _ = await pipe.execute()
                if int(open_count) >= self.quorum:
                    message: dict[str, Any] = {
                        "name": name,
                        "state": "open",
                        "ms": int(duration * 1000),
                        "origin": self.origin,
                        "until_ms": until_ms,
                    }
                    await redis.set(
                        f"{self.prefix}{name}:fleet", json.dumps(message), px=message["ms"]
                    )
                    await redis.publish(self.CHANNEL, json.dumps(message))
        except Exception as exc:  # RedisUnavailable included: stay local
            log.info("breaker.fleet_unavailable", breaker=name, error=type(exc).__name__)

    async def _report_reset(self, name: str) -> None:
        try:
            async with self.gateway.guard() as redis:
                await redis.delete(self._key(name), f"{self.prefix}{name}:fleet")
                message = {"name": name, "state": "closed", "origin": self.origin}
                await redis.publish(self.CHANNEL, json.dumps(message))
        except Exception as exc:
            log.info("breaker.fleet_unavailable", breaker=name, error=type(exc).__name__)

    def _apply(self, message: dict[str, Any]) -> None:
        if message.get("origin") == self.origin:
            return
        name = str(message.get("name", ""))
        if name not in self.registry:
            return  # a breaker this process never used: nothing to protect here
        breaker = self.registry.get(name)
        if message.get("state") == "open":
            # Remaining time from the sender's wall clock, bounded by what it announced.
            remaining = min(
                float(message.get("ms", 0)) / 1000,
                (float(message.get("until_ms", 0)) - time.time() * 1000) / 1000,
            )
            if remaining > 0:
                breaker.open_for(remaining, reason=f"fleet:{message.get('origin')}")
        elif message.get("state") == "closed" and breaker.state is not BreakerState.CLOSED:
            breaker._forced = None
            breaker._transition(BreakerState.CLOSED, reason="fleet_reset", notify=False)

    async def sync(self) -> None:
        """Read the fleet state of every known breaker once (start-up, Redis came back)."""
        names = self.registry.names()
        if not names:
            return
        try:
            async with self.gateway.guard() as redis:
                values = await redis.mget([f"{self.prefix}{name}:fleet" for name in names])
        except Exception as exc:
            log.info("breaker.fleet_unavailable", error=type(exc).__name__)
            return
        for raw in values:
            if raw:
                self._apply(json.loads(raw))

    async def _listen(self) -> None:
        """Subscribe to fleet events; resubscribe with backoff while Redis is away."""
        delay = 0.1
        while not self._closed:
            pubsub = None
            try:
                pubsub = self.gateway.client().pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.CHANNEL)
                delay = 0.1
                await self.sync()  # anything published while we were not subscribed
                while not self._closed:
                    # At most a second between flushes of the batched call counts.
                    flush_all_metrics(self.registry)
                    item = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if item is None or item.get("type") != "message":
                        continue
                    try:
                        self._apply(json.loads(item["data"]))
                    except (ValueError, TypeError, KeyError):
                        log.warning("breaker.fleet_bad_message")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("breaker.fleet_listen_failed", error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)
            finally:
                if pubsub is not None:
                    # Bounded: redis-py can wait forever closing a pubsub cancelled mid-read.
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1):
                            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            # redis-py's reads can swallow a cancellation that races their own timeout (the
            # task stays "cancelling" forever): cancel again until it is really gone.
            for _ in range(40):
                self._task.cancel()
                done, _ = await asyncio.wait({self._task}, timeout=0.05)
                if done:
                    break
        for task in list(self._pending):
            task.cancel()
        for name in list(self._hooked):
            breaker = self.registry.get(name)
            with contextlib.suppress(ValueError):
                breaker._listeners.remove(self._on_transition)
        self._hooked.clear()
        with contextlib.suppress(ValueError):
            self.registry._created.remove(self._hook)


async def start_breakers(settings: Settings, gateway: RedisGateway) -> BreakerFleet | None:
    """Apply the BREAKER_ settings to the default profile and, with BREAKER_FLEET, start the
    fleet sync (the runtime keeps it in ``extensions["breakers"]`` and closes it at stop)."""
    breakers.configure(
        failure_rate=settings.BREAKER_FAILURE_RATE,
        slow_call_rate=settings.BREAKER_SLOW_CALL_RATE,
        slow_call_duration=settings.BREAKER_SLOW_CALL_DURATION.total_seconds(),
        window_size=settings.BREAKER_WINDOW_SIZE,
        minimum_calls=settings.BREAKER_MINIMUM_CALLS,
        open_duration=settings.BREAKER_OPEN_DURATION.total_seconds(),
        half_open_calls=settings.BREAKER_HALF_OPEN_CALLS,
    )
    if not settings.BREAKER_FLEET:
        return None
    fleet = BreakerFleet(breakers, gateway, quorum=settings.BREAKER_FLEET_QUORUM)
    await fleet.start()
    return fleet


def breaker_router(
    registry: BreakerRegistry | None = None,
    *,
    prefix: str = "/api/admin/circuit-breakers",
    dependencies: list[params.Depends] | None = None,
) -> APIRouter:
    """``GET {prefix}`` (every breaker's status) and ``POST {prefix}/reset`` (``?name=`` one,
    or all). ``dependencies`` carries the admin guard (authentication, MFA) of the app."""
    chosen = registry if registry is not None else breakers
    router = APIRouter(prefix=prefix, tags=["admin"], dependencies=dependencies or [])

    @router.get("")
    async def list_breakers() -> dict[str, Any]:
        return {"breakers": chosen.status()}

    @router.post("/reset")
    async def reset_breakers(name: str | None = None) -> dict[str, Any]:
        try:
            names = chosen.reset(name)
        except KeyError:
            raise NotFound(f"no circuit breaker named {name!r}") from None
        return {"reset": names, "breakers": chosen.status()}

    return router
