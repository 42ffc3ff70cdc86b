"""`surge bench ping`: GET /livez through Surge's whole stack versus a bare FastAPI app.

Both run under uvicorn (uvloop + httptools) with the same worker count, both servers up for
the whole run, measured in pairs whose order alternates (surge, bare; bare, surge; ...) so a
window of this noisy 2-core machine that speeds up or slows down during a pair favours
neither side. The ratio (the median of the paired surge rps / bare rps) is what Surge's own
middleware, metrics and logging cost. Target: ≥ 0.9 (issue 17; ADR 0023, 0049).

Surge runs as in production: on a migrated database, so its background loops (revocation
and cache listeners, view refresh, console sampler) do their real work instead of failing
and retrying against missing tables (ADR 0049). Each run also reports each server's CPU per
request (user + kernel of its process tree, from ``/proc``): a figure the other processes of
the machine disturb far less than requests/s.

Both run as ``surge serve`` runs Surge: on uvicorn's httptools protocol with each
fixed-length response written once (``surge.kit.web.protocol``, ADR 0056). The same server
for both is the rule of this bench: the ratio is what Surge's stack costs, not what its
server gains. A third server, the bare app on uvicorn's stock protocol (two writes per
response), is measured in the same rounds (``stock_protocol`` in the JSON): what the
one-write protocol gives any app, and Surge's ratio against the stock server (the figure
this bench reported before ADR 0056).

Load: wrk (when installed: 2 threads, 64 connections) or the bundled closed-loop generator.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._loadgen import (
    CONNECTIONS,
    cross_check_wrk,
    generator_name,
    load,
    stop_servers,
    uvicorn_server,
    wait_ready,
)
from bench.common import console, median, report
from bench.load.cpu import CpuMeter
from surge.kit.db import migrate
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from surge.kit.web.protocol import PROTOCOL

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
#: Issue 17: Surge's whole stack at ≥ 0.9 of a bare FastAPI app's requests/s (ADR 0023).
TARGET = 0.9


def main(quick: bool = False) -> None:
    reps, seconds = (2, 4.0) if quick else (5, 10.0)
    folder = Path(tempfile.mkdtemp(prefix="surge-bench-ping-"))
    pg = EmbeddedPostgres(folder / "pg")
    redis = EmbeddedRedis(folder / "redis")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with console.status("Starting PostgreSQL, Redis, Surge and the bare app..."):
            pg.start()
            redis.start()
            migrate.upgrade(pg.url)
            metrics_dir = folder / "metrics"
            metrics_dir.mkdir()
            env = {
                **os.environ,
                "DATABASE_URL": pg.url,
                "REDIS_URL": redis.url,
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                "SURGE_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(ROOT),
            }
            surge_port, bare_port, stock_port = free_port(), free_port(), free_port()
            procs.append(
                uvicorn_server(
                    "surge.app:create_app", surge_port, env, workers=WORKERS, factory=True,
                    http=PROTOCOL,
                )
            )  # fmt: skip
            procs.append(
                uvicorn_server(
                    "bench._bare_app:app", bare_port, env, workers=WORKERS, factory=False,
                    http=PROTOCOL,
                )
            )  # fmt: skip
            procs.append(
                uvicorn_server(
                    "bench._bare_app:app", stock_port, env, workers=WORKERS, factory=False
                )
            )
            surge_url = f"http://127.0.0.1:{surge_port}/livez"
            bare_url = f"http://127.0.0.1:{bare_port}/livez"
            stock_url = f"http://127.0.0.1:{stock_port}/livez"
            wait_ready(surge_url, procs[0])
            wait_ready(bare_url, procs[1])
            wait_ready(stock_url, procs[2])
        load(surge_url, 2)  # warm all three (imports, caches, connection setup)
        load(bare_url, 2)
        load(stock_url, 2)
        ours: list[dict[str, float]] = []
        base: list[dict[str, float]] = []
        cross = cross_check_wrk()
        wrk_ours: list[dict[str, float]] = []
        wrk_base: list[dict[str, float]] = []
        meter = CpuMeter()
        meter.add("surge", lambda: [procs[0].pid])
        meter.add("bare", lambda: [procs[1].pid])
        meter.add("stock", lambda: [procs[2].pid])
        stock: list[dict[str, float]] = []
        from rich.progress import Progress

        def measured(name: str, url: str, generator: str) -> dict[str, float]:
            before = meter.sample(0.0)
            result = load(url, seconds, generator=generator)
            after = meter.sample(0.0)
            served = max(1.0, result["rps"] * seconds)
            used = sum(after.roles[name]) - sum(before.roles[name])
            return {**result, "cpu_us": used / served * 1e6}

        with Progress(console=console) as progress:
            task = progress.add_task(
                f"{reps} × (surge, bare, bare on stock httptools), {seconds:.0f}s each",
                total=reps * 3,
            )
            for rep in range(reps):
                # Odd rounds run in reverse: a drifting window then favours neither side of
                # the (surge, bare) pair; the stock-protocol bare app alternates the same way.
                order = ("surge", "bare", "stock") if rep % 2 == 0 else ("stock", "bare", "surge")
                for side in order:
                    if side == "surge":
                        ours.append(measured("surge", surge_url, "ours"))
                    elif side == "bare":
                        base.append(measured("bare", bare_url, "ours"))
                    else:
                        stock.append(measured("stock", stock_url, "ours"))
                    progress.advance(task)
                if cross:  # the same pair with wrk, in the same window
                    wrk_ours.append(load(surge_url, seconds, generator="wrk"))
                    wrk_base.append(load(bare_url, seconds, generator="wrk"))
    finally:
        stop_servers(procs)
        redis.stop()
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)

    ratios = [o["rps"] / b["rps"] for o, b in zip(ours, base, strict=True)]
    ours_rps, base_rps = median([o["rps"] for o in ours]), median([b["rps"] for b in base])
    ours_p99, base_p99 = median([o["p99_ms"] for o in ours]), median([b["p99_ms"] for b in base])
    ours_cpu, base_cpu = median([o["cpu_us"] for o in ours]), median([b["cpu_us"] for b in base])
    ratio = median(ratios)
    stock_ratios = [o["rps"] / s["rps"] for o, s in zip(ours, stock, strict=True)]
    stock_cpu = median([s["cpu_us"] for s in stock])
    protocol_gain = [b["rps"] / s["rps"] for b, s in zip(base, stock, strict=True)]
    report(
        "ping",
        ours={"rps": round(ours_rps), "p99_ms": round(ours_p99, 2), "runs_rps": [round(o["rps"]) for o in ours],
              "cpu_us_per_request": round(ours_cpu, 1), "runs_cpu_us": [round(o["cpu_us"], 1) for o in ours]},
        baseline={"rps": round(base_rps), "p99_ms": round(base_p99, 2), "runs_rps": [round(b["rps"]) for b in base],
                  "cpu_us_per_request": round(base_cpu, 1), "runs_cpu_us": [round(b["cpu_us"], 1) for b in base],
                  "what": "bare FastAPI app, no middleware, same uvicorn settings and protocol as Surge"},
        ratio=ratio,
        target=TARGET,
        ok=ratio >= TARGET,
        rows=[
            ("requests/s (median)", f"{ours_rps:,.0f}", f"{base_rps:,.0f}"),
            ("p99 latency ms (median)", f"{ours_p99:.2f}", f"{base_p99:.2f}"),
            ("server CPU µs per request (median)", f"{ours_cpu:.1f}", f"{base_cpu:.1f}"),
            ("ratio of paired runs (median)", f"{ratio:.3f}", "1.000"),
            ("Surge vs bare on stock httptools: ratio", f"{median(stock_ratios):.3f}", "1.000"),
            ("bare on stock httptools: CPU µs/request", f"{ours_cpu:.1f}", f"{stock_cpu:.1f}"),
            *([("same, measured with wrk (interleaved)", f"{median([o['rps'] / b['rps'] for o, b in zip(wrk_ours, wrk_base, strict=True)]):.3f}", "1.000")] if cross else []),
        ],
        extra={
            "workers": WORKERS, "connections": CONNECTIONS, "seconds_per_run": seconds, "reps": reps,
            "load_generator": generator_name(),
            "paired_ratios": [round(r, 3) for r in ratios],
            "order": "rounds alternate: (surge, bare, stock) in even rounds, (stock, bare, surge) in odd ones",
            "protocol": {"surge": PROTOCOL, "baseline": PROTOCOL},
            "stock_protocol": {
                "what": "the bare app on uvicorn's stock httptools protocol (two writes per response)",
                "surge_ratio": round(median(stock_ratios), 3),
                "bare_protocol_gain": round(median(protocol_gain), 3),
                "paired_ratios": [round(r, 3) for r in stock_ratios],
                "rps": round(median([s["rps"] for s in stock])),
                "runs_rps": [round(s["rps"]) for s in stock],
                "cpu_us_per_request": round(stock_cpu, 1),
                "runs_cpu_us": [round(s["cpu_us"], 1) for s in stock],
            },
            **({"wrk_cross_check": {
                "ratio": round(median([o["rps"] / b["rps"] for o, b in zip(wrk_ours, wrk_base, strict=True)]), 3),
                "paired_ratios": [round(o["rps"] / b["rps"], 3) for o, b in zip(wrk_ours, wrk_base, strict=True)],
                "surge_rps": round(median([o["rps"] for o in wrk_ours])),
                "bare_rps": round(median([b["rps"] for b in wrk_base])),
            }} if cross else {}),
        },
        title="surge bench ping — GET /livez, full Surge stack vs bare FastAPI",
    )  # fmt: skip


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
