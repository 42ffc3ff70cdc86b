"""Runs the generator processes and turns what they recorded into figures.

``closed(...)``: wrk's closed loop over ``processes`` × (connections / processes) keep-alive
connections; rps, p50/p99 and errors (what ``bench/_loadgen.load`` returns).

``open_run(...)``: the open-loop users of a scenario, split over ``processes`` generator
processes that share one start instant; returns every request's record.

``summarize(...)``: HdrHistogram percentiles to p99.9 of latency counted from when each
request was *due* (steady phase only), offered and served rates, errors, and where the time
went (client-side wait before sending, the server's queue and app time from
``Server-Timing``), per step and per second.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from bench.load.engine import (
    BAD_BODY,
    NO_ANSWER,
    ClosedPlan,
    OpenPlan,
    Records,
    new_histogram,
    run_closed,
    run_open,
)
from bench.load.scenario import User

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


def _pool(processes: int) -> ProcessPoolExecutor:
    # spawn: a fresh interpreter per generator (no inherited event loop, no forked sockets).
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))


def closed(
    host: str,
    port: int,
    path: str,
    seconds: float,
    *,
    connections: int = 64,
    processes: int = 2,
    tokens: Sequence[str] = (),
) -> dict[str, float]:
    """rps, p50_ms, p99_ms, errors of ``seconds`` of closed-loop load (wrk ``-t2 -c64``)."""
    per = [connections // processes + (1 if i < connections % processes else 0)
           for i in range(processes)]  # fmt: skip
    with _pool(processes) as pool:
        for warm in [pool.submit(time.sleep, 0.3) for _ in range(processes)]:
            warm.result()  # every interpreter up before the clock starts
        start = time.time() + 1.5
        futures = [
            pool.submit(
                run_closed,
                ClosedPlan(host, port, path, n, seconds, list(tokens[i::processes]) or
                           list(tokens), start),
            )
            for i, n in enumerate(per)
            if n
        ]  # fmt: skip
        results = [f.result() for f in futures]
    histogram = new_histogram()
    for result in results:
        histogram.decode_and_add(result["histogram"])
    requests = sum(int(r["requests"]) for r in results)
    elapsed = max(float(r["elapsed"]) for r in results)
    return {
        "rps": requests / elapsed,
        "p50_ms": histogram.get_value_at_percentile(50) / 1000,
        "p99_ms": histogram.get_value_at_percentile(99) / 1000,
        "errors": sum(int(r["errors"]) for r in results),
    }


def open_run(
    host: str,
    port: int,
    scenario: str,
    users: list[User],
    *,
    think: float,
    ramp: float,
    duration: float,
    processes: int,
    service_token: str | None,
    seed: int,
    population: list[User] | None = None,
    on_tick: Any = None,
    on_start: Any = None,
) -> Records:
    """Every request of one open-loop run. ``on_tick(elapsed_s)`` is called about every
    second while it runs (progress bar, metrics scraping); ``on_start(pids)`` once the
    generator processes are up (CPU accounting)."""
    with _pool(processes) as pool:
        for warm in [pool.submit(time.sleep, 0.3) for _ in range(processes)]:
            warm.result()
        if on_start is not None:
            on_start([p.pid for p in pool._processes.values() if p.pid is not None])
        start = time.time() + 2.0
        futures = [
            pool.submit(
                run_open,
                OpenPlan(host, port, scenario, users[i::processes], population or users,
                         service_token, think, ramp, duration, start, seed * 97 + i),
            )
            for i in range(processes)
        ]  # fmt: skip
        while not all(f.done() for f in futures):
            time.sleep(0.5)
            if on_tick is not None:
                on_tick(max(0.0, time.time() - start))
        records = Records()
        for future in futures:
            records.extend(Records.from_wire(future.result()))
    return records


def _percentiles(histogram: HdrHistogram) -> dict[str, float]:
    out = {f"p{p:g}_ms": round(histogram.get_value_at_percentile(p) / 1000, 2)
           for p in PERCENTILES}  # fmt: skip
    out["mean_ms"] = round(histogram.get_mean_value() / 1000, 2)
    out["max_ms"] = round(histogram.get_max_value() / 1000, 2)
    return out


def summarize(
    records: Records, step_names: Sequence[str], *, steady_from: float, steady_to: float
) -> dict[str, Any]:
    """Figures of the requests *due* in [steady_from, steady_to) seconds."""
    lo, hi = int(steady_from * 1e6), int(steady_to * 1e6)
    overall = new_histogram()
    per_step = {name: new_histogram() for name in step_names}
    send_wait = new_histogram()
    server_queue = new_histogram()
    server_app = new_histogram()
    statuses: dict[str, int] = {}
    count = errors = answered = 0
    last_done = 0
    for i in range(len(records.due)):
        due = records.due[i]
        if due < lo or due >= hi:
            continue
        count += 1
        latency = max(1, records.done[i] - due)
        overall.record_value(min(latency, 299_999_999))
        per_step[step_names[records.step[i]]].record_value(min(latency, 299_999_999))
        send_wait.record_value(max(1, min(records.sent[i] - due, 299_999_999)))
        if records.queue_us[i] >= 0:
            server_queue.record_value(max(1, records.queue_us[i]))
        if records.app_us[i] >= 0:
            server_app.record_value(max(1, records.app_us[i]))
        status = records.status[i]
        key = "no answer" if status == NO_ANSWER else "bad body" if status == BAD_BODY \
            else str(status)  # fmt: skip
        statuses[key] = statuses.get(key, 0) + 1
        if status < 200 or status >= 500 or status == 429:
            errors += 1
        if status != NO_ANSWER:
            answered += 1
            last_done = max(last_done, records.done[i])
    window = steady_to - steady_from
    # Served: requests the server answered (any status), over the time it took to answer
    # them; a request that timed out or was never sent was offered, not served.
    served_window = max(window, (last_done - lo) / 1e6) if answered else window
    return {
        "requests": count,
        "offered_rps": round(count / window, 1) if window else 0.0,
        "served_rps": round(answered / served_window, 1) if served_window else 0.0,
        "errors": errors,
        "error_rate": round(errors / count, 6) if count else 0.0,
        "statuses": statuses,
        "latency": _percentiles(overall),
        "steps": {
            name: {"requests": h.get_total_count(), **_percentiles(h)}
            for name, h in per_step.items()
            if h.get_total_count()
        },
        "where": {
            "client_wait_before_send": _percentiles(send_wait),
            "server_queue": _percentiles(server_queue),
            "server_app": _percentiles(server_app),
        },
    }


def timeline(records: Records, seconds: int) -> list[dict[str, float]]:
    """Per second of due time: requests, errors, p50/p95/p99 latency (for the report)."""
    buckets = [new_histogram() for _ in range(seconds + 1)]
    errors = [0] * (seconds + 1)
    served = [0] * (seconds + 1)
    for i in range(len(records.due)):
        second = records.due[i] // 1_000_000
        if 0 <= second <= seconds:
            buckets[second].record_value(min(max(1, records.done[i] - records.due[i]),
                                             299_999_999))  # fmt: skip
            status = records.status[i]
            if status < 200 or status >= 500 or status == 429:
                errors[second] += 1
        done_second = records.done[i] // 1_000_000
        if 0 <= done_second <= seconds and records.status[i] != NO_ANSWER:
            served[done_second] += 1
    out = []
    for second, histogram in enumerate(buckets):
        n = histogram.get_total_count()
        out.append({
            "t": second, "offered": n, "served": served[second], "errors": errors[second],
            "p50": histogram.get_value_at_percentile(50) / 1000 if n else 0.0,
            "p95": histogram.get_value_at_percentile(95) / 1000 if n else 0.0,
            "p99": histogram.get_value_at_percentile(99) / 1000 if n else 0.0,
        })  # fmt: skip
    return out
