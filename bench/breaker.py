"""`surge bench breaker`: per-call overhead of a CLOSED circuit breaker, Surge vs pybreaker and
purgatory, around the same async no-op, in one run.

Each repetition times a bare loop (``await noop()`` N times) and then each breaker doing the
same N calls, in a rotated order so a slow window of this noisy 2-core machine does not always
hit the same contender. Overhead per call = (loop time - bare loop time) / N, in µs; we report
the median over the repetitions. Forms compared:

- surge: ``await breaker.call(noop)`` (count window, metrics on, default config);
- surge guard: ``async with breaker.guard(): await noop()``;
- purgatory 3: its async decorator (``@factory("name")``), in-memory unit of work;
- pybreaker 1.4: ``with breaker.calling(): await noop()`` (pybreaker has no native asyncio:
  ``call_async`` needs Tornado), plus its native sync ``breaker.call(fn)`` against a bare sync
  loop for reference.

Also measured, not part of the ratio: the cost of a call refused by an OPEN breaker (what an
outage costs per call), absolute µs including raising the exception.

Target: surge's median overhead ≤ the fastest async peer's (ratio ≤ 1.0).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable

import pybreaker
from purgatory import AsyncCircuitBreakerFactory

from bench.common import console, median, report
from surge.kit.breaker import Breaker, BreakerConfig

Loop = Callable[[int], Awaitable[float]]


async def noop() -> int:
    return 1


def sync_noop() -> int:
    return 1


def contenders() -> dict[str, Loop]:
    ours = Breaker("bench", BreakerConfig())
    ours_guard = Breaker("bench-guard", BreakerConfig())
    purgatory_factory = AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    purgatory_noop = purgatory_factory("bench")(noop)
    pyb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30, name="bench")

    async def bare(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await noop()
        return time.perf_counter() - started

    async def surge(n: int) -> float:
        call = ours.call
        started = time.perf_counter()
        for _ in range(n):
            await call(noop)
        return time.perf_counter() - started

    async def surge_guard(n: int) -> float:
        guard = ours_guard.guard
        started = time.perf_counter()
        for _ in range(n):
            async with guard():
                await noop()
        return time.perf_counter() - started

    async def purgatory(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await purgatory_noop()
        return time.perf_counter() - started

    async def pybreaker_async(n: int) -> float:
        calling = pyb.calling
        started = time.perf_counter()
        for _ in range(n):
            with calling():
                await noop()
        return time.perf_counter() - started

    return {
        "bare": bare,
        "surge": surge,
        "surge_guard": surge_guard,
        "purgatory": purgatory,
        "pybreaker": pybreaker_async,
    }


async def boom() -> int:
    raise RuntimeError("down")


async def rejection_costs(n: int) -> dict[str, float]:
    """µs per call refused by an OPEN breaker (the fail-fast path during an outage)."""
    ours = Breaker("bench-open", BreakerConfig(minimum_calls=1, window_size=1, open_duration=3600))
    purgatory_noop = AsyncCircuitBreakerFactory(default_threshold=1, default_ttl=3600)(
        "bench-open"
    )(boom)
    pyb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=3600, name="bench-open")

    async def ours_call() -> None:
        await ours.call(boom)

    async def purgatory_call() -> None:
        await purgatory_noop()

    async def pybreaker_call() -> None:
        with pyb.calling():
            await boom()

    calls = {"surge": ours_call, "purgatory": purgatory_call, "pybreaker": pybreaker_call}
    out: dict[str, float] = {}
    for name, call in calls.items():
        for _ in range(3):  # trip it (pybreaker raises its own error on the tripping call)
            with contextlib.suppress(Exception):
                await call()
        started = time.perf_counter()
        for _ in range(n):
            try:
                await call()
            except RuntimeError as exc:
                raise AssertionError(f"{name} is not open") from exc
            except Exception:
                pass
        out[name] = (time.perf_counter() - started) / n * 1e6
    return out


def sync_overheads(n: int) -> tuple[float, float]:
    """pybreaker's native mode: (bare sync loop, pybreaker.call loop) seconds."""
    pyb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30, name="bench-sync")
    started = time.perf_counter()
    for _ in range(n):
        sync_noop()
    bare = time.perf_counter() - started
    call = pyb.call
    started = time.perf_counter()
    for _ in range(n):
        call(sync_noop)
    return bare, time.perf_counter() - started


async def run(reps: int, n: int) -> dict[str, list[float]]:
    loops = contenders()
    names = [name for name in loops if name != "bare"]
    overhead: dict[str, list[float]] = {name: [] for name in [*names, "pybreaker_sync"]}
    for name in names:  # warm-up: imports, first allocations, metric children
        await loops[name](1000)
    gc.disable()  # a collection landing in one contender's loop would skew that one
    try:
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                bare = await loops["bare"](n)
                took = await loops[name](n)
                overhead[name].append((took - bare) / n * 1e6)
            bare_sync, pyb_sync = sync_overheads(n)
            overhead["pybreaker_sync"].append((pyb_sync - bare_sync) / n * 1e6)
            for name, cost in (await rejection_costs(n // 4)).items():
                overhead.setdefault(f"open_{name}", []).append(cost)
            gc.collect()
    finally:
        gc.enable()
    return overhead


def main(quick: bool = False) -> None:
    reps, n = (5, 5_000) if quick else (21, 20_000)
    console.print(f"breaker overhead: {reps} interleaved repetitions x {n} calls each")
    overhead = asyncio.run(run(reps, n))
    med = {name: round(median(values), 3) for name, values in overhead.items()}
    fastest_peer = min(med["purgatory"], med["pybreaker"])
    ratio = med["surge"] / fastest_peer if fastest_peer > 0 else float("inf")
    rows = [
        ("surge  call()  µs/call", f"{med['surge']:.3f}", ""),
        ("surge  guard() µs/call", f"{med['surge_guard']:.3f}", ""),
        ("purgatory 3 async µs/call", "", f"{med['purgatory']:.3f}"),
        ("pybreaker calling() around await µs/call", "", f"{med['pybreaker']:.3f}"),
        ("pybreaker sync call() µs/call (native mode)", "", f"{med['pybreaker_sync']:.3f}"),
        ("OPEN: surge rejection µs/call", f"{med['open_surge']:.3f}", ""),
        ("OPEN: purgatory rejection µs/call", "", f"{med['open_purgatory']:.3f}"),
        ("OPEN: pybreaker rejection µs/call", "", f"{med['open_pybreaker']:.3f}"),
        ("surge / fastest async peer (closed)", f"{ratio:.3f}", "target ≤ 1.0"),
    ]
    report(
        "breaker",
        ours={
            "call_overhead_us": med["surge"],
            "guard_overhead_us": med["surge_guard"],
            "open_rejection_us": med["open_surge"],
        },
        baseline={
            "purgatory_async_overhead_us": med["purgatory"],
            "pybreaker_calling_overhead_us": med["pybreaker"],
            "pybreaker_sync_overhead_us": med["pybreaker_sync"],
            "purgatory_open_rejection_us": med["open_purgatory"],
            "pybreaker_open_rejection_us": med["open_pybreaker"],
        },
        ratio=ratio,
        target=1.0,
        ok=ratio <= 1.0,
        rows=rows,
        extra={
            "repetitions": reps,
            "calls_per_repetition": n,
            "method": "median over interleaved reps of (loop - bare loop) / calls; closed breaker",
        },
    )


if __name__ == "__main__":
    main()
