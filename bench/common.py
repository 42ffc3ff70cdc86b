"""Shared plumbing for benchmarks (docs/architecture.md §7).

Every benchmark compares Surge against a baseline *in the same run*, repeats the pair several
times interleaved (this machine is noisy: ±20-40 % between windows), and reports medians and
ratios. ``report()`` prints a human table (stderr) and, as the last line of stdout, one JSON
object, and writes it to ``bench/results/NAME.json`` — or, for a ``--quick`` smoke run, to
``bench/results/quick/NAME.json`` (git-ignored), so a smoke run never replaces a committed
figure. Logs go to stderr: stdout carries the JSON line only.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from surge.kit.telemetry.logging import configure_logging

RESULTS = Path(__file__).resolve().parent / "results"
#: Where ``--quick`` runs write (git-ignored): smoke tests, not figures.
QUICK_RESULTS = RESULTS / "quick"
#: A ``--quick`` run: ``surge bench --quick`` sets it; ``python -m bench.NAME --quick`` too.
QUICK = "--quick" in sys.argv
console = Console(stderr=True)
# structlog's default logger prints to stdout; the protocol keeps stdout for the JSON line.
configure_logging(os.environ.get("SURGE_LOG_LEVEL", "INFO"), json=False)


def results_path(name: str, *, quick: bool | None = None) -> Path:
    """Where ``report(name)`` writes: the committed file, or the quick folder."""
    folder = QUICK_RESULTS if (QUICK if quick is None else quick) else RESULTS
    return folder / f"{name}.json"


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def percentile(values: list[float], q: float) -> float:
    """q in [0, 100]; nearest-rank on the sorted values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[index])


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def report(
    name: str,
    *,
    ours: Mapping[str, Any],
    baseline: Mapping[str, Any],
    ratio: float,
    target: float | str,
    ok: bool,
    rows: list[tuple[str, str, str]] | None = None,
    extra: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Print the table, print the JSON line last, write ``results_path(name)``."""
    if rows:
        table = Table(title=title or f"surge bench {name}")
        table.add_column("metric")
        table.add_column("surge", justify="right")
        table.add_column("baseline", justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    result: dict[str, Any] = {
        "bench": name,
        "ours": dict(ours),
        "baseline": dict(baseline),
        "ratio": round(ratio, 3),
        "target": target,
        "ok": ok,
    }
    if extra:
        result["extra"] = dict(extra)
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["machine"] = machine()
    if QUICK:
        result["quick"] = True
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return result


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a bench's coroutine under uvloop (as production runs), plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is pinned; plain asyncio still works
        asyncio.run(main())
    else:
        uvloop.run(main())
