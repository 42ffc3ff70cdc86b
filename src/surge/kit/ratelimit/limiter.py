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

Redis down: ``RedisGateway`` fails instantly while Redis is known down, so the fallback costs
no timeout. Each policy then fails its own way (``Failure``): ``local`` → a per-process GCRA
with ``limit // processes`` (at least 1), ``open`` → allowed, ``closed`` → refused (503).
Shared limits resume as soon as the gateway's probe sees Redis again.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog
from redis.exceptions import MaxConnectionsError, NoScriptError, ReadOnlyError, RedisError

from surge.kit.errors import SurgeError
from surge.kit.ratelimit.metrics import BATCH_SIZE, DECISIONS, LOCAL_FALLBACK
from surge.kit.ratelimit.policy import Failure, Identify, RatePolicy, subject_from_state
from surge.kit.redis import CONNECTION_ERRORS, RedisGateway, RedisUnavailable
from surge.kit.web.client_ip import ClientIpResolver

log = structlog.get_logger()

#: A *batch* of decisions in one script run, evaluated one after the other in arrival order
#: (each sees the TATs the previous ones wrote, exactly as if they had come one by one).
#: ARGV[1]: now in µs, or 0 for Redis' own clock (one clock for every process of the fleet).
#: ARGV[2]: how many limits each decision has, space separated ("3 3 1").
#: ARGV[3]: the keys of every decision of the batch, decision after decision, one per line.
#: ARGV[4]: "interval_us period_us cost enforce" of each of those keys, one per line.
#: Keys and specs travel as two strings, not as KEYS and one argument each: redis-py packs
#: every argument in Python (~0.8 µs each, ~100 µs for a batch of 32 three-limit
#: decisions); two joined strings cost ~3 µs. A batch mixes many callers' keys anyway, so
#: it could never be routed by one key's slot (ADR 0006: one Redis, or one shard per
#: limiter; not Redis Cluster).
#: Returns, per decision: blocked, then per limit: ok, tat - now, new_tat - now (µs).
#: A key several decisions of the batch share (one caller's many requests) is read once and
#: written once, with the TAT the last of them left: Redis' own work per batch stays
#: proportional to distinct keys, not to decisions.
GCRA_LUA = """
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local keys, specs = {}, {}
for key in string.gmatch(ARGV[3], '[^\\n]+') do keys[#keys + 1] = key end
for spec in string.gmatch(ARGV[4], '[^\\n]+') do specs[#specs + 1] = spec end
local tats = {}     -- key -> its TAT as this batch left it (one GET per key per batch)
local written = {}  -- keys to SET at the end, in first-write order (one SET per key)
local dirty = {}
local out = {}
local k = 0
for count in string.gmatch(ARGV[2], '%d+') do
  local n = tonumber(count)
  local head = #out + 1
  out[head] = 0
  local new_tats = {}
  local blocked = 0
  for j = 1, n do
    local i = k + j
    local interval, period, cost, enforce =
      string.match(specs[i], '^(%d+) (%d+) (%d+) (%d)$')
    interval, period, cost = tonumber(interval), tonumber(period), tonumber(cost)
    local key = keys[i]
    local tat = tats[key]
    if tat == nil then
      tat = tonumber(redis.call('GET', key) or 0)
      tats[key] = tat
    end
    if tat < now then tat = now end
    local new_tat = tat + interval * cost
    local ok = 0
    if new_tat - now <= period then
      ok = 1
      new_tats[j] = new_tat
    elseif enforce == '1' then
      blocked = 1
    end
    out[#out + 1] = ok
    out[#out + 1] = tat - now
    out[#out + 1] = new_tat - now
  end
  if blocked == 0 then
    for j = 1, n do
      local new_tat = new_tats[j]
      if new_tat and new_tat > now then
        local key = keys[k + j]
        tats[key] = new_tat
        if not dirty[key] then
          dirty[key] = true
          written[#written + 1] = key
        end
      end
    end
  end
  out[head] = blocked
  k = k + n
end
for _, key in ipairs(written) do
  local tat = tats[key]
  redis.call('SET', key, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
return out
"""
GCRA_SHA = hashlib.sha1(GCRA_LUA.encode()).hexdigest()

#: Most decisions one script run carries. Under load a batch is whatever queued while the
#: previous round trip was in flight; the cap bounds how long one script holds Redis
#: (a 3-limit decision is ~6 Redis calls inside Lua, a few µs each: 128 of them ≈ 1-2 ms).
MAX_BATCH = 128
#: How long a decision waits for a free pooled connection before deciding locally.
POOL_WAIT = 0.5
#: Local fallback keys kept per process at most; expired ones are swept first.
LOCAL_MAX_KEYS = 100_000


@dataclass(slots=True)
class _Pending:
    """A decision waiting for its batch: its checks and where its reply slice goes."""

    checks: Sequence[Check]
    future: asyncio.Future[list[Any]]


class RateLimitError(SurgeError):
    """A rate-limit configuration error (unknown policy name, bad declaration)."""


@dataclass(frozen=True, slots=True)
class Check:
    """One limit to apply: a policy, the partition it is spent on, and the cost."""

    policy: RatePolicy
    partition: str
    cost: int = 1
    key: str = field(init=False, compare=False, repr=False)
    """``policy:partition``, formatted once (read by dedupe, batching and the fallback)."""

    def __post_init__(self) -> None:
        partition = self.partition
        if "\n" in partition or "\\" in partition:  # keys travel one per line (GCRA_LUA)
            partition = partition.replace("\\", "\\\\").replace("\n", "\\n")  # injective
        object.__setattr__(self, "key", f"{self.policy.name}:{partition}")


class Verdict(NamedTuple):
    """One policy's answer for one request (a named tuple: immutable, and built twice as
    fast as a frozen dataclass on every limited request)."""

    policy: RatePolicy
    allowed: bool
    """This policy alone would allow the request (shadow policies included)."""
    remaining: int
    """Units left in the policy's budget after this request."""
    reset_after: float
    """Seconds until the budget is full again."""
    retry_after: float
    """Seconds until a request of this cost would pass (0 when allowed)."""
    store: str
    """``redis``, ``local``, ``open`` or ``closed``: who decided."""


@dataclass(slots=True)
class Decision:
    """The limiter's answer for a request: allowed or not, and each policy's verdict."""

    allowed: bool
    verdicts: list[Verdict] = field(default_factory=list)
    unavailable: bool = False
    """Denied because a fail-closed policy could not reach Redis (answer 503, not 429)."""

    @property
    def retry_after(self) -> float:
        return max(
            (v.retry_after for v in self.verdicts if not v.allowed and not v.policy.shadow),
            default=0.0,
        )

    @property
    def denied_by(self) -> list[str]:
        return [v.policy.name for v in self.verdicts if not v.allowed and not v.policy.shadow]


@dataclass(frozen=True, slots=True)
class KeyState:
    """What an admin sees for one key: remaining budget and time until it is full."""

    policy: str
    partition: str
    remaining: int
    reset_after: float


class LocalStore:
    """Per-process GCRA used while Redis is unreachable; the same arithmetic as the script,
    with each policy's limit divided by the number of processes sharing the fleet's budget."""

    def __init__(self, processes: int, clock: Callable[[], float]) -> None:
        self.processes = max(1, processes)
        self.clock = clock
        self._tats: dict[str, int] = {}

    def share(self, policy: RatePolicy) -> tuple[int, int]:
        """(limit, interval µs) of this process's share of ``policy``."""
        limit = max(1, policy.limit // self.processes)
        return limit, max(1, policy.period_us // limit)

    def evaluate(self, checks: Sequence[Check]) -> tuple[bool, list[Verdict]]:
        now = int(self.clock() * 1_000_000)
        if len(self._tats) > LOCAL_MAX_KEYS:
            self._sweep(now)
        rows: list[tuple[Check, bool, int, int, int]] = []
        blocked = False
        for check in checks:
            _, interval = self.share(check.policy)
            tat = max(self._tats.get(check.key, now), now)
            new_tat = tat + interval * check.cost
            ok = new_tat - now <= check.policy.period_us
            if not ok and not check.policy.shadow:
                blocked = True
            rows.append((check, ok, tat - now, new_tat - now, interval))
        verdicts = []
        for check, ok, tat_rel, new_rel, interval in rows:
            if ok and not blocked:
                self._tats[check.key] = now + new_rel
            verdicts.append(
                _verdict(
                    check, ok, tat_rel, new_rel, blocked=blocked, store="local", interval=interval
                )
            )
        return not blocked, verdicts

    def _sweep(self, now: int) -> None:
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        while len(self._tats) > LOCAL_MAX_KEYS // 2:  # all live: drop the oldest inserted
            self._tats.pop(next(iter(self._tats)))

    def clear(self) -> None:
        self._tats.clear()

    def tat(self, key: str) -> int | None:
        return self._tats.get(key)

    def reset(self, key: str) -> None:
        self._tats.pop(key, None)


def _verdict(
    check: Check, ok: bool, tat_rel: int, new_rel: int, *, blocked: bool, store: str, interval: int
) -> Verdict:
    policy = check.policy
    rel = new_rel if ok and not blocked else tat_rel
    period = policy.period_us
    return Verdict(
        policy,
        ok,
        max(0, (period - rel) // interval),
        max(0, rel) / 1e6,
        0.0 if ok else max(0, new_rel - period) / 1e6,
        store,
    )


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
    ) -> None:
        self.gateway = gateway
        #: Concurrent decisions share round trips (see ``_flush``); False sends one EVALSHA
        #: per decision, as before batching (kept for the benchmark's side-by-side).
        self.coalesce = coalesce
        #: Who is calling (replace to plug authentication in; see ``Identify``).
        self.identify: Identify = identify
        #: The client IP of an ASGI scope; by default the TCP peer (no proxy is trusted).
        self.client_ip: Callable[[Any], str] = client_ip or ClientIpResolver(())
        self.policies: dict[str, RatePolicy] = {p.name: p for p in policies}
        self.prefix = prefix
        self.clock = clock
        self.local = LocalStore(local_processes, clock or time.time)
        self._fallback_logged = False
        self._counters: dict[tuple[str, str, str], object] = {}
        self._specs: dict[tuple[str, int], bytes] = {}
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
        try:
            decision = await self._redis(checks)
        except RedisUnavailable:
            decision = self._fallback(checks, outage=True)
        except RedisError as error:  # pool exhausted, OOM...: Redis is up but gave no answer
            self._log_transient(error)
            decision = self._fallback(checks, outage=False)
        else:
            _log_shadow_denials(decision)  # here, in the request's logging context
            return decision  # counted by its batch (_send)
        self._count(decision)
        return decision

    async def hit(self, name: str, partition: str, *, cost: int = 1) -> Decision:
        """Spend ``cost`` of policy ``name`` for ``partition`` (jobs, scripts, tests)."""
        return await self.check([Check(self.policy(name), partition, cost)])

    async def _redis(self, checks: Sequence[Check]) -> Decision:
        self.gateway.client()  # RedisUnavailable at once while Redis is known down
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        pending = _Pending(checks, future)
        if not self.coalesce:
            await self._send([pending])
        else:
            self._queue.append(pending)
            self._start_flusher(loop)
        raw = await future
        blocked = bool(raw[0])
        verdicts = [
            _verdict(
                check, bool(raw[1 + 3 * i]), raw[2 + 3 * i], raw[3 + 3 * i],
                blocked=blocked, store="redis", interval=check.policy.interval_us,
            )
            for i, check in enumerate(checks)
        ]  # fmt: skip
        return Decision(allowed=not blocked, verdicts=verdicts)

    def _start_flusher(self, loop: asyncio.AbstractEventLoop) -> None:
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher.get_loop() is not loop:
            # Nothing in flight: this decision leaves now (the task starts within this
            # event-loop tick and takes whatever else queued in it). Otherwise it rides in
            # the next batch, sent as soon as the round trip in flight returns.
            # A context of its own: the task serves many requests, and must not log with
            # the request id of the one that happened to start it.
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
                    p
                    for p in queue[:MAX_BATCH]
                    # a caller cancelled (request timeout) before its turn spends nothing
                    if not p.future.done() and p.future.get_loop() is loop
                ]
                del queue[:MAX_BATCH]
                if batch:
                    await self._send(batch)
        finally:  # empty unless cancelled (loop shutting down): no caller may wait forever
            for pending in (*batch, *queue):
                if not pending.future.done():
                    pending.future.cancel()
            queue.clear()

    async def _send(self, batch: list[_Pending]) -> None:
        """One EVALSHA for ``batch``; each caller gets its own slice of the reply, or the
        error (each then decides locally, as it would have alone)."""
        keys: list[str] = []
        specs: list[bytes] = []
        counts: list[str] = []
        prefix, known = self.prefix, self._specs
        for pending in batch:
            for check in pending.checks:
                keys.append(check.key)
                spec = known.get((check.policy.name, check.cost))
                if spec is None:
                    policy = check.policy
                    spec = known[(policy.name, check.cost)] = (
                        f"{policy.interval_us} {policy.period_us} {check.cost} "
                        f"{int(not policy.shadow)}"
                    ).encode()
                specs.append(spec)
            counts.append(str(len(pending.checks)))
        args: list[int | bytes] = [
            int(self.clock() * 1_000_000) if self.clock else 0,
            " ".join(counts).encode(),
            (prefix + ("\n" + prefix).join(keys)).encode(),
            b"\n".join(specs),
        ]
        BATCH_SIZE.observe(len(batch))
        try:
            raw = await self._evalsha(args)
        except Exception as error:  # handed to each caller, who decides its own way
            failure = self._classify(error)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(failure)
            return
        position = 0
        tally: dict[tuple[str, str, str], int] = {}
        for pending in batch:
            end = position + 1 + 3 * len(pending.checks)
            if not pending.future.done():
                pending.future.set_result(raw[position:end])
            for i, check in enumerate(pending.checks):  # spent even if its caller has gone
                _tally(tally, check.policy, bool(raw[position + 1 + 3 * i]), "redis")
            position = end
        self._add(tally)

    def _classify(self, error: Exception) -> Exception:
        """What a failed round trip means for its callers: an outage (``RedisUnavailable``,
        gateway marked down) or a transient error decided locally for this batch only."""
        if isinstance(error, MaxConnectionsError | RedisUnavailable):
            return error  # pool exhausted is not an outage (see _evalsha): decided locally
        if isinstance(error, ReadOnlyError):  # a failover demoted our server: reconnect
            self.gateway.mark_down(error)
            unavailable = RedisUnavailable("Redis answered READONLY")
        elif isinstance(error, CONNECTION_ERRORS):
            self.gateway.mark_down(error)
            unavailable = RedisUnavailable()
        else:
            return error
        unavailable.__cause__ = error
        return unavailable

    async def _evalsha(self, args: list[int | bytes]) -> Any:
        client = self.gateway.client()  # RedisUnavailable at once while Redis is known down
        # redis-py's asyncio pool raises MaxConnectionsError instead of waiting when every
        # connection is busy (more commands in flight than REDIS_MAX_CONNECTIONS). Redis is
        # fine then: wait for a connection (up to POOL_WAIT) rather than decide locally,
        # which would let a burst spend more than the shared budget.
        deadline = time.monotonic() + POOL_WAIT
        while True:
            try:
                try:
                    return await client.evalsha(GCRA_SHA, 0, *args)  # type: ignore[no-untyped-call]
                except NoScriptError:  # Redis restarted or SCRIPT FLUSH: load, retry once
                    await client.script_load(GCRA_LUA)
                    return await client.evalsha(GCRA_SHA, 0, *args)  # type: ignore[no-untyped-call]
            except MaxConnectionsError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.001)

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
                child = self._counters[key] = DECISIONS.labels(*key)
            child.inc(count)  # type: ignore[attr-defined]

    async def close(self) -> None:
        """Nothing to release: the Redis client belongs to the gateway."""


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


def _unmetered(check: Check, *, allowed: bool, store: str) -> Verdict:
    return Verdict(
        policy=check.policy,
        allowed=allowed,
        remaining=check.policy.limit if allowed else 0,
        reset_after=0.0,
        retry_after=0.0 if allowed else 1.0,
        store=store,
    )


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
