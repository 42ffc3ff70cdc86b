"""`surge bench cluster`: privilege reads and wallet transfers per second through nginx, with
2 API nodes vs 1 API node of the same `surge cluster`, interleaved in one run (issue 18).

Closed loop, fixed concurrency: 80 % ``GET /api/v1/me/privileges``, 20 % idempotent
``POST /api/v1/withdrawals`` (a ledger transfer each). Between runs nginx's upstream is
rewritten (both nodes, or api1 alone) and reloaded. CPU seconds per host (every process of
its namespace, from ``/proc/<pid>/stat``) are reported for each window: on a 2-core machine
the second API node competes for the same cores as PostgreSQL, PgBouncer, nginx and the load
generator, so the ratio is bounded well below 2 — the split says where the cores went.
Requires root and ``make cluster-deps``; brings the cluster up and down itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import common
from bench._chaos_load import Caller
from bench._cluster_faults import ClusterStack
from bench.chaos import World
from surge.cluster.control import Cluster, pids_in, teardown
from surge.cluster.topology import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(cluster: Cluster) -> dict[str, float]:
    out: dict[str, float] = {}
    for host in cluster.config.hosts:
        total = 0
        for pid in pids_in(host.netns):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime + stime
        out[host.name] = total / TICKS
    return out


def use_nodes(cluster: Cluster, count: int) -> None:
    config = cluster.config
    nginx = config.host("nginx")
    folder = config.folder(nginx)
    text = config.nginx_config()
    for host in config.of("api")[count:]:
        text = text.replace(f"server {host.address}:8000", f"server {host.address}:8000 down")
    (folder / "nginx.conf").write_text(text)
    subprocess.run(
        ["ip", "netns", "exec", nginx.netns, "nginx", "-c", str(folder / "nginx.conf"),
         "-p", str(folder), "-s", "reload"],
        check=True, capture_output=True,
    )  # fmt: skip


async def window(
    base: str, callers: list[Caller], *, seconds: float, concurrency: int
) -> dict[str, int]:
    counts = {"read": 0, "transfer": 0, "errors": 0}
    deadline = time.monotonic() + seconds
    rng = random.Random(7)
    partners = [c for c in callers if c.partner]
    async with httpx.AsyncClient(base_url=base, timeout=10,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:  # fmt: skip

        async def loop() -> None:
            while time.monotonic() < deadline:
                if rng.random() < 0.8:
                    caller = rng.choice(callers)
                    response = await client.get(
                        "/api/v1/me/privileges", headers={"Authorization": f"Bearer {caller.token}"}
                    )
                    kind = "read"
                else:
                    caller = rng.choice(partners)
                    response = await client.post(
                        "/api/v1/withdrawals", json={"amount": 1_000},
                        headers={"Authorization": f"Bearer {caller.token}",
                                 "Idempotency-Key": uuid.uuid4().hex},
                    )  # fmt: skip
                    kind = "transfer"
                if 200 <= response.status_code < 300:
                    counts[kind] += 1
                else:
                    counts["errors"] += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return counts


async def measure(quick: bool) -> None:
    root = ROOT / ".data" / "cluster"
    teardown(root)
    cluster = Cluster(ClusterConfig(root=root, api_nodes=2))
    seconds = 8.0 if quick else 20.0
    reps = 1 if quick else 3
    concurrency = 32
    try:
        await asyncio.to_thread(cluster.up, common.console.print)
        world = World(ClusterStack(cluster))  # type: ignore[arg-type]
        await world.seed()
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        await window(cluster.config.base_url, world.callers, seconds=3, concurrency=8)  # warm
        for rep in range(reps):
            for nodes in (2, 1) if rep % 2 == 0 else (1, 2):
                use_nodes(cluster, nodes)
                await asyncio.sleep(1)
                before = cpu_seconds(cluster)
                counts = await window(cluster.config.base_url, world.callers,
                                      seconds=seconds, concurrency=concurrency)  # fmt: skip
                after = cpu_seconds(cluster)
                cpu = {h: round((after[h] - before.get(h, 0)) / seconds, 3) for h in after}
                runs[nodes].append({
                    "reads_per_s": counts["read"] / seconds,
                    "transfers_per_s": counts["transfer"] / seconds,
                    "errors": counts["errors"],
                    "cpu_cores_by_host": {h: v for h, v in cpu.items() if v > 0.005},
                })  # fmt: skip
                common.console.print(f"{nodes} node(s): {runs[nodes][-1]}")
        await world.runtime.stop()
    finally:
        teardown(root)

    def med(nodes: int, key: str) -> float:
        return round(common.median([r[key] for r in runs[nodes]]), 1)

    two = {"reads_per_s": med(2, "reads_per_s"), "transfers_per_s": med(2, "transfers_per_s")}
    one = {"reads_per_s": med(1, "reads_per_s"), "transfers_per_s": med(1, "transfers_per_s")}
    total2 = two["reads_per_s"] + two["transfers_per_s"]
    total1 = one["reads_per_s"] + one["transfers_per_s"]
    ratio = total2 / total1 if total1 else 0.0
    previous = common.results_path("cluster")
    failover = json.loads(previous.read_text()).get("failover") if previous.exists() else None
    result = common.report(
        "cluster",
        ours={"api_nodes": 2, **two},
        baseline={"api_nodes": 1, **one},
        ratio=ratio,
        target="> 1 (2 cores shared by every host: bounded, see cpu split)",
        ok=ratio > 1.0,
        rows=[
            ("reads/s", str(two["reads_per_s"]), str(one["reads_per_s"])),
            ("transfers/s", str(two["transfers_per_s"]), str(one["transfers_per_s"])),
            ("requests/s ratio", f"{ratio:.2f}", "1.00"),
        ],
        extra={
            "runs": runs,
            "seconds": seconds,
            "concurrency": concurrency,
            "note": "every host shares the machine's 2 cores",
        },
        title="surge bench cluster: 2 API nodes vs 1, same cluster, through nginx",
    )
    if failover is not None:  # keep make cluster-test's figures in the same file
        result["failover"] = failover
        previous.write_text(json.dumps(result, indent=2) + "\n")


def main(quick: bool = False) -> None:
    common.run_async(lambda: measure(quick))


if __name__ == "__main__":
    main(quick=common.QUICK)
