"""The generator process: open-loop users or closed-loop connections on uvloop.

``run_open`` (one call per process, in a ``multiprocessing`` spawn child): each virtual user
owns one keep-alive connection and a schedule. Its first request is due at a random moment
of the ramp; each next one is due an exponential think time (mean ``think``) after the
previous one was *due*, whatever the server did meanwhile — the open model of wrk2 and k6's
``constant-arrival-rate``. When a response comes late, the next request goes at once and its
latency still counts from when it was due: a stall shows as the latency users felt, not as
fewer requests (no coordinated omission). Every request is recorded: due, sent, done
(microseconds from the common start), status, step, the server's ``Server-Timing`` (queue,
app) and the request id it echoed.

``run_closed`` is wrk's model for the side-by-side benches (``ping``, ``privileges``): each
connection sends its next request as soon as the previous answer is read. Latencies go into
an HdrHistogram, encoded back to the parent.
"""

from __future__ import annotations

import asyncio
import bisect
import importlib
import itertools
import random
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from bench.load.client import Connection, ConnectionLost, build_request, parse_server_timing
from bench.load.scenario import Call, Context, Step, User

#: Histogram range: 1 µs to 5 min, 3 significant digits (HdrHistogram's usual setting).
HIST_MAX_US = 300_000_000
#: Status recorded for a request that got no HTTP answer (timeout, connection refused/reset).
NO_ANSWER = 0
#: Status recorded when the answer came but the step's ``expect`` rejected its body.
BAD_BODY = 1


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


@dataclass
class OpenPlan:
    host: str
    port: int
    scenario: str
    users: list[User]
    population: list[User]
    service_token: str | None
    think: float
    ramp: float
    duration: float
    #: ``time.time()`` at which second 0 of the run starts (same for every process).
    start_epoch: float
    seed: int
    #: A user gives up on a request this long after it was due (a recorded error).
    timeout: float = 10.0


@dataclass
class Records:
    """Columns of every request one process made (microseconds from the common start)."""

    due: array[int] = field(default_factory=lambda: array("q"))
    sent: array[int] = field(default_factory=lambda: array("q"))
    done: array[int] = field(default_factory=lambda: array("q"))
    status: array[int] = field(default_factory=lambda: array("h"))
    step: array[int] = field(default_factory=lambda: array("b"))
    queue_us: array[int] = field(default_factory=lambda: array("q"))
    app_us: array[int] = field(default_factory=lambda: array("q"))
    request_ids: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    connects: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "due": self.due.tobytes(), "sent": self.sent.tobytes(), "done": self.done.tobytes(),
            "status": self.status.tobytes(), "step": self.step.tobytes(),
            "queue_us": self.queue_us.tobytes(), "app_us": self.app_us.tobytes(),
            "request_ids": self.request_ids, "errors": self.errors, "connects": self.connects,
        }  # fmt: skip

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Records:
        out = cls()
        for name, code in (("due", "q"), ("sent", "q"), ("done", "q"), ("status", "h"),
                           ("step", "b"), ("queue_us", "q"), ("app_us", "q")):  # fmt: skip
            column = array(code)
            column.frombytes(wire[name])
            setattr(out, name, column)
        out.request_ids = list(wire["request_ids"])
        out.errors = dict(wire["errors"])
        out.connects = int(wire["connects"])
        return out

    def extend(self, other: Records) -> None:
        for name in ("due", "sent", "done", "status", "step", "queue_us", "app_us"):
            getattr(self, name).extend(getattr(other, name))
        self.request_ids.extend(other.request_ids)
        for key, count in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + count
        self.connects += other.connects


def load_scenario(name: str) -> Any:
    return importlib.import_module(f"bench.load.scenarios.{name}")


def _with_start_header(raw_head: bytes, body: bytes) -> bytes:
    """The request with ``X-Request-Start: t=<epoch µs>`` (the server's queue-time anchor)."""
    return b"%sX-Request-Start: t=%d\r\n\r\n%s" % (raw_head, int(time.time() * 1e6), body)


def _head(call: Call, host: str) -> tuple[bytes, bytes]:
    raw = build_request(call.method, call.path, host, call.headers, call.body)
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + b"\r\n", body


def _timing_ms(value: str) -> tuple[float, float]:
    """(queue, app) milliseconds of a ``Server-Timing`` value (-0.001 when absent); Surge's
    own ``queue;dur=…, app;dur=…`` without the general parser's splits."""
    if value.startswith("queue;dur="):
        queue, sep, app = value[10:].partition(", app;dur=")
        if sep:
            try:
                return float(queue), float(app)
            except ValueError:
                pass
    parsed = parse_server_timing(value)
    return parsed.get("queue", -0.001), parsed.get("app", -0.001)


async def _open_main(plan: OpenPlan) -> Records:
    scenario = load_scenario(plan.scenario)
    steps: list[Step] = list(scenario.STEPS)
    cumulative = list(itertools.accumulate(s.weight for s in steps))
    total_weight = cumulative[-1]
    context = Context(users=plan.population, service_token=plan.service_token)
    records = Records()
    host = f"{plan.host}:{plan.port}"
    perf_zero = time.perf_counter() + (plan.start_epoch - time.time())
    end = plan.ramp + plan.duration
    sleep = asyncio.sleep
    perf = time.perf_counter
    timeout = asyncio.timeout
    append_due, append_sent, append_done = (
        records.due.append,
        records.sent.append,
        records.done.append,
    )
    append_status, append_step = records.status.append, records.step.append
    append_queue, append_app = records.queue_us.append, records.app_us.append
    append_id = records.request_ids.append

    def now() -> float:
        return perf() - perf_zero

    def record(due: float, sent: float, done: float, *, status: int, step: int,
               timing: str = "", request_id: str = "") -> None:  # fmt: skip
        append_due(int(due * 1e6))
        append_sent(int(sent * 1e6))
        append_done(int(done * 1e6))
        append_status(status)
        append_step(step)
        queue_ms, app_ms = _timing_ms(timing) if timing else (-0.001, -0.001)
        append_queue(int(queue_ms * 1000))
        append_app(int(app_ms * 1000))
        append_id(request_id)

    def error(label: str) -> None:
        records.errors[label] = records.errors.get(label, 0) + 1

    async def user_loop(index: int, user: User) -> None:
        rng = random.Random(plan.seed * 1_000_003 + index)
        connection = Connection(plan.host, plan.port, keep_body=True)
        due = plan.ramp * rng.random() if plan.ramp > 0 else rng.uniform(0, plan.think)
        rate = 1.0 / plan.think
        #: step index → [(head, body, expect)] of a ``static`` step, built once for this user.
        built: dict[int, list[tuple[bytes, bytes, Any]]] = {}
        try:
            while due < end:
                wait = due - now()
                if wait > 0:
                    await sleep(wait)
                step_index = bisect.bisect_right(cumulative, rng.random() * total_weight)
                step_index = min(step_index, len(steps) - 1)
                step = steps[step_index]
                calls = built.get(step_index)
                if calls is None:
                    calls = [(*_head(c, host), c.expect)
                             for c in step.build(user, rng, context)]  # fmt: skip
                    if step.static:
                        built[step_index] = calls
                call_due = due
                for head, body, expect in calls:
                    sent = now()
                    # The user's patience runs from when the request was due: one that is
                    # already older than the timeout is a timeout, not sent (else an
                    # overloaded run never ends: every user would work through its backlog).
                    patience = plan.timeout - (sent - call_due)
                    if patience <= 0:
                        error(f"{step.name}: timed out before it could be sent")
                        record(call_due, sent, sent, status=NO_ANSWER, step=step_index)
                        break
                    try:
                        # asyncio.timeout, not wait_for: no extra Task per request.
                        async with timeout(patience):
                            response = await connection.request(_with_start_header(head, body))
                    except (TimeoutError, ConnectionLost, OSError) as exc:
                        # A client that gives up closes its connection (a browser's aborted
                        # fetch does too): the next request pays a new handshake, counted
                        # in ``connects``.
                        connection.close()
                        error(f"{step.name}: {type(exc).__name__}")
                        record(call_due, sent, now(), status=NO_ANSWER, step=step_index)
                        break
                    status = response.status
                    if expect is not None and status < 400:
                        problem = expect(status, response.body)
                        if problem is not None:
                            error(f"{step.name}: {problem}")
                            status = BAD_BODY
                    elif status >= 400:
                        error(f"{step.name}: HTTP {status}")
                    record(
                        call_due,
                        sent,
                        now(),
                        status=status,
                        step=step_index,
                        timing=response.server_timing,
                        request_id=response.request_id,
                    )
                    call_due = now()  # a follow-up call is due when the previous one ended
                due += rng.expovariate(rate)
        finally:
            records.connects += connection.connects
            connection.close()

    await asyncio.gather(*(user_loop(i, u) for i, u in enumerate(plan.users)))
    return records


def run_open(plan: OpenPlan) -> dict[str, Any]:
    """Entry point of a generator process (picklable arguments in, picklable result out).
    The collector as in a Surge web process (ADR 0041): the plan (300 000 users) out of its
    sight, and few collections — a full one stops every user's loop for tens of ms, which
    the run would count as the server's latency."""
    import gc

    import uvloop

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

    return uvloop.run(_open_main(plan)).to_wire()


# ---- closed loop (wrk's model) -------------------------------------------------------------


@dataclass
class ClosedPlan:
    host: str
    port: int
    path: str
    connections: int
    seconds: float
    tokens: list[str]
    start_epoch: float


async def _closed_main(plan: ClosedPlan) -> dict[str, Any]:
    host = f"{plan.host}:{plan.port}"
    requests = [
        build_request("GET", plan.path, host, {"Authorization": f"Bearer {t}"}) for t in plan.tokens
    ] or [build_request("GET", plan.path, host)]
    histogram = new_histogram()
    counts = {"requests": 0, "errors": 0}
    start = time.perf_counter() + max(0.0, plan.start_epoch - time.time())
    stop_at = start + plan.seconds
    connections = [Connection(plan.host, plan.port) for _ in range(plan.connections)]
    await asyncio.gather(*(c.connect() for c in connections))
    delay = start - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)

    async def loop(index: int, connection: Connection) -> None:
        perf = time.perf_counter
        turn = index
        n = len(requests)
        record = histogram.record_value
        requests_made = errors = 0
        while (began := perf()) < stop_at:
            response = await connection.request(requests[turn % n])
            turn += 1
            record(max(1, int((perf() - began) * 1e6)))
            requests_made += 1
            if response.status >= 400:
                errors += 1
        counts["requests"] += requests_made
        counts["errors"] += errors

    await asyncio.gather(*(loop(i, c) for i, c in enumerate(connections)))
    elapsed = time.perf_counter() - start
    for connection in connections:
        connection.close()
    return {**counts, "elapsed": elapsed, "histogram": histogram.encode()}


def run_closed(plan: ClosedPlan) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_closed_main(plan))
