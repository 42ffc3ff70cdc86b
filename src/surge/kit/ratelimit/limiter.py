"""``RateLimiter``: GCRA, exact; every limit of a request in one round trip, shared.

    SurgeError
    └── RateLimitError      a configuration mistake (unknown policy name)

A denied request is not an exception here: ``check`` returns a ``Decision`` and the web layer
turns it into 429 (``TooManyRequests``) or, for a fail-closed policy without Redis, 503.

Algorithm: GCRA (the "virtual scheduling" form of a leaky bucket, as in redis-cell and
Redis 8.8's ``GCRA``). Each key stores one number, the theoretical arrival time (TAT) in
integer microseconds. A request of cost ``c`` is allowed when
``max(TAT, now) + c × interval − now ≤ period`` with ``interval = period // limit``: exactly
``limit`` units pass in a burst, the ``limit + 1``-th is refused, and capacity then returns
one unit every ``interval`` (no window edge where 2 × limit can pass, as with fixed windows).
Integer µs keep the arithmetic exact in Lua's doubles (epoch µs ≈ 1.8e15 < 2^53).

At most one round trip: the middleware hands every applicable limit (tier + IP + endpoint)
to one Lua script (EVALSHA; SCRIPT LOAD and retry once on NOSCRIPT). For each decision the
script checks all of its limits, and only if none that is enforced denies does it write the
new TATs: a denied request spends nobody's budget. Shadow policies are checked and counted
but never deny.

Coalescing ("natural batching"): one process has at most one limiter round trip in flight.
A decision that finds none leaves at once (no timer, no added latency when idle); decisions
that arrive while one is in flight queue, and the next EVALSHA carries all of them (up to
``MAX_BATCH``). The script evaluates a batch's decisions one after the other in arrival
order, atomically, each seeing what the previous ones wrote: the outcome is exactly that of
sending them one by one, for a fraction of the cost (redis-py spends ~50-100 µs of Python per
command; 64 decisions in flight share one command). ``coalesce=False`` restores one EVALSHA
per decision.

Leases (``lease=True``, ADR 0028): a process takes a few units of a key's budget with a
decision it sends anyway and spends them in memory; a decision whose every limit is covered
by a lease costs no round trip. Exact GCRA in Redis still decides every unit handed out, so
the overshoot is bounded (processes × lease size per window; ``_lease``). Policies with
``lease=0``, shadow ones and small limits stay exact.

Redis down: ``RedisGateway`` fails instantly while Redis is known down, so the fallback costs
no timeout. Each policy then fails its own way (``Failure``): ``local`` → a per-process GCRA
with ``limit // processes`` (at least 1), ``open`` → allowed, ``closed`` → refused (503).
Shared limits resume as soon as the gateway's probe sees Redis again.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]
import structlog
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError

from surge.kit.ratelimit._lease import Leases, lease_cap, lease_size
from surge.kit.ratelimit._local import LOCAL_MAX_KEYS, LocalStore
from surge.kit.ratelimit._script import _EVALSHA, GCRA_LUA, GCRA_SHA
from surge.kit.ratelimit.decision import (
    Check,
    Decision,
    KeyState,
    RateLimitError,
    Verdict,
    _Pending,
    _unmetered,
    _verdict,
)
from surge.kit.ratelimit.metrics import BATCH_SIZES, DECISIONS_BATCHED, LOCAL_FALLBACK
from surge.kit.ratelimit.policy import Failure, Identify, RatePolicy, subject_from_state
from surge.kit.redis import (
    CONNECTION_ERRORS,
    RedisGateway,
    RedisUnavailable,
    is_closed_transport,
)
from surge.kit.web.client_ip import ClientIpResolver

log = structlog.get_logger()

__all__ = [
    "GCRA_LUA",
    "GCRA_SHA",
    "LOCAL_MAX_KEYS",
    "MAX_BATCH",
    "Check",
    "Decision",
    "KeyState",
    "LocalStore",
    "RateLimitError",
    "RateLimiter",
    "Verdict",
]


#: Most decisions one script run carries. Under load a batch is whatever queued while the
#: previous round trip was in flight; the cap bounds how long one script holds Redis
#: (a 3-limit decision is ~6 Redis calls inside Lua, a few µs each: 128 of them ≈ 1-2 ms).
MAX_BATCH = 128


class RateLimiter:
    """Decides requests against policies: Redis first, each policy's fallback otherwise.

    ``clock`` is injectable (tests drive time); by default Redis' ``TIME`` is the clock so
    every process and host agrees on it, and the local fallback uses ``time.time``.
    """

    def __init__(
        self,
        gateway: RedisGateway,
        policies: Sequence[RatePolicy],
        *,
        prefix: str = "rl:",
        local_processes: int = 1,
        clock: Callable[[], float] | None = None,
        identify: Identify = subject_from_state,
        client_ip: Callable[[Any], str] | None = None,
        coalesce: bool = True,
        lease: bool = False,
    ) -> None:
        self.gateway = gateway
        #: Spend leased units in memory (ADR 0028); False: every decision in Redis (exact).
        self.lease = lease
        #: Concurrent decisions share round trips (see ``_flush``); False sends one EVALSHA
        #: per decision, as before batching (kept for the benchmark's side-by-side).
        self.coalesce = coalesce
        #: Who is calling (replace to plug authentication in; see ``Identify``).
        self.identify: Identify = identify
        #: The client IP of an ASGI scope; by default the TCP peer (no proxy is trusted).
        self.client_ip: Callable[[Any], str] = client_ip or ClientIpResolver(())
        self.policies: dict[str, RatePolicy] = {p.name: p for p in policies}
        self.prefix = prefix
        self._wire_prefix = prefix.encode()
        self.clock = clock
        self.local = LocalStore(local_processes, clock or time.time)
        #: Units a key's first lease of each policy carries (0: exact), sized for
        #: ``local_processes``; a busy key's lease grows up to ``lease_caps`` (ADR 0039).
        self.lease_sizes: dict[str, int] = {
            p.name: lease_size(p, local_processes) if lease else 0 for p in policies
        }
        self.lease_caps: dict[str, int] = {
            p.name: lease_cap(p, local_processes) if lease else 0 for p in policies
        }
        self.leases = Leases()
        self._lease_clock = clock or time.monotonic
        self._lease_counted: dict[str, object] = {}
        self._fallback_logged = False
        self._counters: dict[tuple[str, str, str], object] = {}
        self._transient_logged_at = 0.0
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        gateway.on_change(self._redis_changed)

    # ---- configuration ---------------------------------------------------------------------
    def policy(self, name: str) -> RatePolicy:
        try:
            return self.policies[name]
        except KeyError:
            raise RateLimitError(f"no rate-limit policy named {name!r}") from None

    # ---- decisions ---------------------------------------------------------------------
    async def check(self, checks: Sequence[Check]) -> Decision:
        """Apply every check atomically: all pass and are spent, or none is spent."""
        if not checks:
            return Decision(allowed=True)
        checks = _dedupe(checks)
        leases = self.leases
        if not leases:
            return await self._decide(checks)
        now = int(self._lease_clock() * 1_000_000)
        taken, covered = leases.take_all(checks, now)
        if covered == 0:
            return await self._decide(checks)
        self._count_leased(checks, taken)
        if covered == len(checks):  # every limit covered by this process's leases: no round trip
            return Decision.leased(checks, taken)  # type: ignore[arg-type]
        decided = await self._decide(
            [c for c, rel in zip(checks, taken, strict=True) if rel is None]
        )
        if not decided.allowed:  # all or nothing: the leased units go back to their leases
            for check, rel in zip(checks, taken, strict=True):
                if rel is not None:
                    leases.give_back(check)
        return _merge(checks, taken, decided)

    async def _decide(self, checks: Sequence[Check]) -> Decision:
        """``checks`` decided in Redis (each policy's fallback without it)."""
        try:
            # The Redis path inline (it was a second coroutine per request, ADR 0023).
            self.gateway.lane()  # RedisUnavailable at once while Redis is known down
            loop = asyncio.get_running_loop()
            future: asyncio.Future[list[int]] = loop.create_future()
            if not self.coalesce:
                await self._send([(checks, future)])
            else:
                self._queue.append((checks, future))
                flusher = self._flusher
                if flusher is None or flusher.done() or flusher.get_loop() is not loop:
                    self._start_flusher(loop)
            decision = Decision.from_script(checks, await future)
        except RedisUnavailable:
            decision = self._fallback(checks, outage=True)
        except RedisError as error:  # pool exhausted, OOM...: Redis is up but gave no answer
            self._log_transient(error)
            decision = self._fallback(checks, outage=False)
        else:
            if decision.shadow_denied:  # logged here, in the request's logging context
                _log_shadow_denials(decision)
            return decision  # counted by its batch (_send)
        self._count(decision)
        return decision

    async def hit(self, name: str, partition: str, *, cost: int = 1) -> Decision:
        """Spend ``cost`` of policy ``name`` for ``partition`` (jobs, scripts, tests)."""
        return await self.check([Check(self.policy(name), partition, cost)])

    def _start_flusher(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called by ``check`` when no flusher runs on ``loop``: nothing in flight, so this
        decision leaves now (the task starts within this event-loop tick and takes whatever
        else queued in it). While one runs, a decision rides in its next batch, sent as
        soon as the round trip in flight returns. A context of its own: the task serves many
        requests, and must not log with the request id of the one that happened to start
        it."""
        self._flusher = loop.create_task(
            self._flush(), name="ratelimit.flush", context=contextvars.Context()
        )

    async def _flush(self) -> None:
        """Send the queued decisions, ``MAX_BATCH`` at a time, one round trip in flight at a
        time, until the queue is empty ("natural batching": no timer, a lone decision goes
        at once, under load a batch is whatever queued during the previous round trip)."""
        queue = self._queue
        loop = asyncio.get_running_loop()
        batch: list[_Pending] = []
        try:
            while queue:
                batch = [
                    pending
                    for pending in queue[:MAX_BATCH]
                    # a caller cancelled (request timeout) before its turn spends nothing
                    if not pending[1].done() and pending[1].get_loop() is loop
                ]
                del queue[:MAX_BATCH]
                if batch:
                    await self._send(batch)
        finally:  # empty unless cancelled (loop shutting down): no caller may wait forever
            for _, future in (*batch, *queue):
                if not future.done():
                    future.cancel()
            queue.clear()

    async def _send(self, batch: list[_Pending]) -> None:
        """One EVALSHA for ``batch``; each caller gets its own slice of the reply, or the
        error (each then decides locally, as it would have alone)."""
        prefix = self._wire_prefix
        sizes, caps, leases = self.lease_sizes, self.lease_caps, self.leases
        lease_now = int(self._lease_clock() * 1_000_000)
        keys: list[bytes] = []
        numbers: list[int] = []
        specs: dict[tuple[int, ...], int] = {}  # spec (+ lease asked) → its number in the batch
        for checks, _ in batch:
            numbers.append(len(checks))
            for check in checks:
                keys.append(prefix + check.wire)
                size = sizes.get(check.policy.name, 0)
                if size:  # a busy key asks for more (ADR 0039)
                    size = leases.ask(check, size, caps[check.policy.name], lease_now)
                spec = (*check.spec, size)
                number = specs.get(spec)
                if number is None:
                    number = specs[spec] = len(specs) + 1
                numbers.append(number)
        now = int(self.clock() * 1_000_000) if self.clock else 0
        BATCH_SIZES.observe(len(batch))
        try:
            raw, grants = await self._evalsha(
                _PACKER.pack([now, numbers, keys, [v for spec in specs for v in spec]])
            )
        except Exception as error:  # handed to each caller, who decides its own way
            failure = self._classify(error)
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            return
        if grants:
            self._grant(batch, raw, grants)
        position = 0
        tally: dict[tuple[str, str, str], int] = {}
        for checks, future in batch:
            end = position + len(checks)
            found = raw[position:end]
            if not future.done():
                future.set_result(found)
            for check, rel in zip(checks, found, strict=True):  # spent even if its caller left
                _tally(tally, check.policy, check.allows(rel), "redis")
            position = end
        self._add(tally)

    def _grant(self, batch: list[_Pending], raw: list[int], grants: list[int]) -> None:
        """Record the leases the script granted (``grants``: flat pairs of a limit's number
        in the batch, from 1, and its units): spent in Redis even if the caller left."""
        flat = [check for checks, _ in batch for check in checks]
        now = int(self._lease_clock() * 1_000_000)
        caps = self.lease_caps
        for index in range(0, len(grants), 2):
            number = grants[index] - 1
            check = flat[number]
            self.leases.grant(check, raw[number], grants[index + 1], now,
                              caps.get(check.policy.name, 0))  # fmt: skip

    def _count_leased(self, checks: Sequence[Check], taken: list[int | None]) -> None:
        counters = self._lease_counted
        for check, rel in zip(checks, taken, strict=True):
            if rel is not None:
                child = counters.get(check.policy.name)
                if child is None:
                    child = counters[check.policy.name] = DECISIONS_BATCHED.labels(
                        check.policy.name, "allowed", "lease"
                    )
                child.inc(1)  # type: ignore[attr-defined]

    def _classify(self, error: Exception) -> Exception:
        """What a failed round trip means for its callers: an outage (``RedisUnavailable``,
        gateway marked down) or a transient error decided locally for this batch only."""
        if isinstance(error, RedisUnavailable):
            return error
        if isinstance(error, ReadOnlyError):  # a failover demoted our server: reconnect
            self.gateway.mark_down(error)
            unavailable = RedisUnavailable("Redis answered READONLY")
        elif isinstance(error, CONNECTION_ERRORS) or is_closed_transport(error):
            self.gateway.mark_down(error)
            unavailable = RedisUnavailable()
        else:
            return error
        unavailable.__cause__ = error
        return unavailable

    async def _evalsha(self, *args: int | bytes) -> Any:
        # The gateway's pipelined lane (surge.kit.resp), not the redis-py pool: one
        # connection carries every batch of the process, so it never runs out of
        # connections, and a command costs about half the CPU (ADR 0012).
        lane = self.gateway.lane()  # RedisUnavailable at once while Redis is known down
        try:
            return await lane.execute(*_EVALSHA, *args)
        except NoScriptError:  # Redis restarted or SCRIPT FLUSH: load, retry once
            await lane.execute(b"SCRIPT", b"LOAD", GCRA_LUA)
            return await lane.execute(*_EVALSHA, *args)

    def _fallback(self, checks: Sequence[Check], *, outage: bool) -> Decision:
        """Decide without Redis, each policy its own way (this decision only, if not
        ``outage``; until the gateway reports Redis back, if ``outage``)."""
        if outage and not self._fallback_logged:
            self._enter_fallback()
        local = [c for c in checks if c.policy.failure is Failure.local]
        closed = [c for c in checks if c.policy.failure is Failure.closed]
        allowed, verdicts = self.local.evaluate(local) if local else (True, [])
        for check in checks:
            if check.policy.failure is Failure.open:
                verdicts.append(_unmetered(check, allowed=True, store="open"))
        unavailable = any(not c.policy.shadow for c in closed)
        for check in closed:
            verdicts.append(_unmetered(check, allowed=False, store="closed"))
        return Decision(
            allowed=allowed and not unavailable, verdicts=verdicts, unavailable=unavailable
        )

    # ---- admin ---------------------------------------------------------------------------
    async def state(self, name: str, partition: str) -> KeyState:
        """One key's budget as Redis holds it (the local fallback's while Redis is down)."""
        policy = self.policy(name)
        key = f"{name}:{partition}"
        try:
            async with self.gateway.guard() as client:
                now_s, now_us = await client.time()
                raw = await client.get(self.prefix + key)
            now = now_s * 1_000_000 + now_us if self.clock is None else int(self.clock() * 1e6)
            interval = policy.interval_us
        except RedisUnavailable:
            now = int(self.local.clock() * 1_000_000)
            local_tat = self.local.tat(key)
            raw = None if local_tat is None else str(local_tat)
            _, interval = self.local.share(policy)
        rel = max(0, int(raw) - now) if raw is not None else 0
        return KeyState(
            policy=name,
            partition=partition,
            remaining=max(0, (policy.period_us - rel) // interval),
            reset_after=rel / 1e6,
        )

    async def reset(self, name: str, partition: str) -> None:
        """Give one key its whole budget back (support desk, tests)."""
        key = f"{self.policy(name).name}:{partition}"
        self.local.reset(key)
        self.leases.forget(key)  # this process's; another's lease runs out on its own
        async with self.gateway.guard() as client:
            await client.delete(self.prefix + key)

    # ---- fallback bookkeeping ----------------------------------------------------------
    def _log_transient(self, error: BaseException) -> None:
        now = time.monotonic()
        if now - self._transient_logged_at >= 1.0:  # at most one line a second under load
            self._transient_logged_at = now
            log.warning("ratelimit.redis_error", error=f"{type(error).__name__}: {error}")

    def _enter_fallback(self) -> None:
        self._fallback_logged = True
        LOCAL_FALLBACK.set(1)
        log.warning(
            "ratelimit.fallback.local",
            processes=self.local.processes,
            reason="redis unavailable; each process enforces its share of every limit",
        )

    def _redis_changed(self, up: bool) -> None:
        if not up:
            if not self._fallback_logged:
                self._enter_fallback()
            return
        if self._fallback_logged:
            self._fallback_logged = False
            self.local.clear()
            LOCAL_FALLBACK.set(0)
            log.info("ratelimit.fallback.ended")

    def _count(self, decision: Decision) -> None:
        tally: dict[tuple[str, str, str], int] = {}
        for verdict in decision.verdicts:
            _tally(tally, verdict.policy, verdict.allowed, verdict.store)
        self._add(tally)
        _log_shadow_denials(decision)

    def _add(self, tally: dict[tuple[str, str, str], int]) -> None:
        """Add counts to ``ratelimit_decisions_total``: once per label set and batch, not
        once per verdict (in multiprocess mode each ``inc`` is a locked mmap write)."""
        for key, count in tally.items():
            child = self._counters.get(key)
            if child is None:
                child = self._counters[key] = DECISIONS_BATCHED.labels(*key)
            child.inc(count)  # type: ignore[attr-defined]

    async def close(self) -> None:
        """Nothing to release: the Redis client belongs to the gateway."""


#: One packer for every batch of the process (``msgpack.packb`` builds a new one per call).
#: ``use_bin_type=False``: bytes go as the "raw" string type, which every server's cmsgpack
#: reads; Redis 6.2's rejects the newer bin types ("Bad data format in input").
_PACKER = msgpack.Packer(use_bin_type=False)


def _log_shadow_denials(decision: Decision) -> None:
    for verdict in decision.verdicts:
        if not verdict.allowed and verdict.policy.shadow:
            log.info("ratelimit.shadow_denied", policy=verdict.policy.name)


def _tally(
    tally: dict[tuple[str, str, str], int], policy: RatePolicy, allowed: bool, store: str
) -> None:
    if allowed:
        outcome = "allowed"
    elif policy.shadow:
        outcome = "shadow_denied"
    else:
        outcome = "denied"
    key = (policy.name, outcome, store)
    tally[key] = tally.get(key, 0) + 1


def _merge(checks: Sequence[Check], taken: list[int | None], decided: Decision) -> Decision:
    """One decision for ``checks`` from the leased part (``taken``: TAT − now per leased
    check, None for the others) and ``decided``, the others' decision."""
    if decided.rels is not None:
        remote = iter(decided.rels)
        rels = [next(remote) if rel is None else rel for rel in taken]
        return Decision.from_script(checks, rels)
    blocked = not decided.allowed
    verdicts = list(decided.verdicts)
    for check, rel in zip(checks, taken, strict=True):
        if rel is not None:
            verdicts.append(
                _verdict(
                    check, True, rel, rel + check.step, blocked=blocked, store="lease",
                    interval=check.policy.interval_us,
                )
            )  # fmt: skip
    return Decision(decided.allowed, verdicts, decided.unavailable)


def _dedupe(checks: Sequence[Check]) -> Sequence[Check]:
    """One key at most once per decision (a policy named by the middleware and a route)."""
    if len(checks) < 2:
        return checks
    if len(checks) == 2:  # the common case (tier + IP): no dict for two distinct keys
        first, second = checks
        if first.key != second.key:
            return checks
    seen: dict[str, Check] = {}
    for check in checks:
        previous = seen.get(check.key)
        if previous is None or check.cost > previous.cost:
            seen[check.key] = check
    return list(seen.values()) if len(seen) != len(checks) else checks
