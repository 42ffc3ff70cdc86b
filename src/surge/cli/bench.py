"""Measurement: ``surge load`` (open-loop load on a fresh Surge) and ``surge bench NAME``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from surge.cli._common import PROJECT_ROOT


def load(
    scenario: Annotated[
        str, typer.Argument(help="A file in bench/load/scenarios/: seed003, seed003_writes, ping.")
    ] = "seed003",
    *,
    users: Annotated[
        int, typer.Option(help="Signed-in users, one keep-alive connection each.")
    ] = 10_000,
    population: Annotated[int, typer.Option(help="Users in the database (bulk SQL).")] = 300_000,
    think: Annotated[
        str, typer.Option(help="Mean think time between a user's requests (5s, 500ms).")
    ] = "5s",
    duration: Annotated[str, typer.Option(help="Steady phase measured (after the ramp).")] = "60s",
    ramp: Annotated[str, typer.Option(help="Users start spread over this long.")] = "20s",
    processes: Annotated[int, typer.Option(help="Generator processes.")] = 2,
    workers: Annotated[int, typer.Option(help="Surge web processes.")] = 2,
    seed: Annotated[int, typer.Option(help="Population, plan mix and schedules.")] = 3,
    capacity: Annotated[
        bool, typer.Option("--capacity", help="Then search the highest rate meeting the targets.")
    ] = False,
    step_duration: Annotated[str, typer.Option(help="Steady phase of each capacity step.")] = "30s",
    warm_cache: Annotated[
        bool, typer.Option("--warm-cache", help="Cache tiers in steady state before the run.")
    ] = False,
) -> None:
    """Open-loop load on a fresh Surge: seed 003's users, latency from the intended start,
    JSON as the last line (bench/results/load-SCENARIO.json) and an HTML report beside it."""
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.load.main import Options, run

    run(Options(scenario=scenario, users=users, population=population, think=_seconds(think),
                duration=_seconds(duration), ramp=_seconds(ramp), processes=processes,
                workers=workers, seed=seed, capacity=capacity,
                step_duration=_seconds(step_duration), warm_cache=warm_cache))  # fmt: skip


def _seconds(value: str) -> float:
    """``5s``, ``500ms``, ``2m`` or a bare number of seconds."""
    text = value.strip().lower()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def bench(
    name: Annotated[
        str,
        typer.Argument(
            help="A file of bench/ (ping, cache, ratelimit, jobs, breaker, ledger, notifications, operations, payments, privileges, chaos, ...) or all"
        ),
    ],
    quick: Annotated[bool, typer.Option(help="Shorter runs (smoke test, noisier).")] = False,
) -> None:
    """Run a benchmark from bench/ side by side with its baseline; writes bench/results/NAME.json
    (a --quick run writes bench/results/quick/NAME.json instead)."""
    import importlib

    sys.path.insert(0, str(PROJECT_ROOT))
    from bench import common

    common.QUICK = quick  # quick runs write bench/results/quick/, never the committed figures
    names = _bench_names() if name == "all" else [name]
    for bench_name in names:
        try:
            module = importlib.import_module(f"bench.{bench_name}")
        except ModuleNotFoundError as error:
            raise typer.BadParameter(
                f"no benchmark {bench_name!r} (have: {', '.join(_bench_names())})"
            ) from error
        module.main(quick=quick)


def _bench_names() -> list[str]:
    folder = PROJECT_ROOT / "bench"
    return sorted(
        p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and p.stem != "common"
    )
