"""`surge bench cluster`: privilege reads and wallet transfers per second through nginx, with
2 API nodes vs 1 API node of the same `surge cluster`, interleaved in one run (issue 18).

Closed loop, fixed concurrency, from ``GENERATORS`` spawned generator processes in the
machine's own namespace (``bench/_cluster_mix.py``, over ``bench.load``'s client): 44
connections send ``GET /api/v1/me/privileges``, 4 idempotent ``POST /api/v1/withdrawals``
(a ledger transfer each: a synchronous commit that credits the one ``holds`` account, whose
row stays locked until COMMIT, ADR 0024 — their rate is the database tier's, which a second
API node does not add to; the reads are the API tier's). Between windows nginx's upstream is rewritten (both nodes, or api2 marked
``down``) and reloaded; windows alternate 2-1, 1-2, 2-1 so drift hits both sides. CPU
seconds per host (every process of its namespace, from ``/proc/<pid>/stat``; ``load`` is the
generators) are reported for each window: on a 2-core machine the second API node competes
for the same cores as PostgreSQL, PgBouncer, nginx and the load generator, so the ratio is
bounded well below 2 — the split says where the cores went.
Requires root and ``make cluster-deps``; brings the cluster up and down itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from bench import common
from bench._cluster_faults import ClusterStack
from bench._cluster_mix import MixLoad
from bench.chaos import World
from surge.cluster.control import Cluster, pids_in, teardown
from surge.cluster.topology import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
GENERATORS = 2
CONNECTIONS = 48
#: Of ``CONNECTIONS``, those sending withdrawals. Few: they all credit the one ``holds``
#: row, so more writers add lock waits, not transfers (10 writers alone: 36/s on one node,
#: 22/s on two; 1 writer: 22/s at 32 ms each — measured on this machine, busy).
WRITERS = 4


def _ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def cpu_seconds(cluster: Cluster, load_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of every host's processes, and of the load generators."""
    out = {host.name: _ticks(pids_in(host.netns)) / TICKS for host in cluster.config.hosts}
    out["load"] = _ticks(load_pids) / TICKS
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


async def measure(quick: bool) -> None:
    root = ROOT / ".data" / "cluster"
    teardown(root)
    cluster = Cluster(ClusterConfig(root=root, api_nodes=2))
    seconds = 10.0 if quick else 20.0
    reps = 1 if quick else 3
    host, port = cluster.config.host("nginx").address, 80
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    load_before = os.getloadavg()
    load = MixLoad(GENERATORS)
    try:
        await asyncio.to_thread(cluster.up, common.console.print)
        world = World(ClusterStack(cluster))  # type: ignore[arg-type]
        await world.seed()
        readers = [c.token for c in world.callers]
        writers = [c.token for c in world.callers if c.partner]

        def measure_window(nodes: int, seconds: float, seed: int) -> dict[str, Any]:
            before = cpu_seconds(cluster, load.pids())
            figures = load.window(host, port, readers=readers, writers=writers,
                                  seconds=seconds, connections=CONNECTIONS,
                                  writer_connections=WRITERS, seed=seed)  # fmt: skip
            after = cpu_seconds(cluster, load.pids())
            span = figures["seconds"] + 1.0  # the generators' 1 s start delay is in the CPU
            figures["cpu_cores_by_host"] = {
                h: round((after[h] - before.get(h, 0.0)) / span, 3)
                for h in after if after[h] - before.get(h, 0.0) > 0.005 * span
            }  # fmt: skip
            figures["api_nodes"] = nodes
            return figures

        use_nodes(cluster, 2)
        await asyncio.to_thread(measure_window, 2, 4.0, 1)  # warm: both nodes' pools and caches
        for rep in range(reps):
            for nodes in (2, 1) if rep % 2 == 0 else (1, 2):
                use_nodes(cluster, nodes)
                await asyncio.sleep(1)
                figures = await asyncio.to_thread(measure_window, nodes, seconds, 10 + rep)
                runs[nodes].append(figures)
                common.console.print(f"{nodes} node(s): {figures}")
        await world.runtime.stop()
    finally:
        load.close()
        teardown(root)

    def med(nodes: int, key: str) -> float:
        return round(common.median([r[key] for r in runs[nodes]]), 1)

    def cpu(nodes: int) -> dict[str, float]:
        hosts = {h for r in runs[nodes] for h in r["cpu_cores_by_host"]}
        return {h: round(common.median([r["cpu_cores_by_host"].get(h, 0.0)
                                        for r in runs[nodes]]), 2) for h in sorted(hosts)}  # fmt: skip

    def ratio_of(key: str) -> float:
        """Median over repetitions of (2 nodes ÷ 1 node), each pair measured back to back."""
        pairs = zip(runs[2], runs[1], strict=True)
        return common.median([a[key] / b[key] if b[key] else 0.0 for a, b in pairs])

    keys = ("reads_per_s", "transfers_per_s", "read_p50_ms", "read_p99_ms",
            "transfer_p50_ms", "transfer_p99_ms")  # fmt: skip
    two = {key: med(2, key) for key in keys}
    one = {key: med(1, key) for key in keys}
    ratio = ratio_of("reads_per_s")
    transfers_ratio = ratio_of("transfers_per_s")
    previous = common.results_path("cluster")
    kept = json.loads(previous.read_text()) if previous.exists() else {}
    failovers = {k: v for k, v in kept.items() if k.startswith("failover")}
    result = common.report(
        "cluster",
        ours={"api_nodes": 2, **two},
        baseline={"api_nodes": 1, **one},
        ratio=ratio,
        target="reads/s > 1 (2 cores shared by every host: bounded, see cpu split)",
        ok=ratio > 1.0,
        rows=[
            ("reads/s", str(two["reads_per_s"]), str(one["reads_per_s"])),
            (
                "read p50 / p99 ms",
                f"{two['read_p50_ms']} / {two['read_p99_ms']}",
                f"{one['read_p50_ms']} / {one['read_p99_ms']}",
            ),
            ("transfers/s", str(two["transfers_per_s"]), str(one["transfers_per_s"])),
            (
                "transfer p50 / p99 ms",
                f"{two['transfer_p50_ms']} / {two['transfer_p99_ms']}",
                f"{one['transfer_p50_ms']} / {one['transfer_p99_ms']}",
            ),
            ("reads/s ratio (median of pairs)", f"{ratio:.2f}", "1.00"),
            ("transfers/s ratio", f"{transfers_ratio:.2f}", "1.00"),
            (
                "API nodes' CPU (cores)",
                str(sum(v for h, v in cpu(2).items() if h.startswith("api"))),
                str(sum(v for h, v in cpu(1).items() if h.startswith("api"))),
            ),
        ],
        extra={
            "transfers_ratio": round(transfers_ratio, 3),
            "runs": runs,
            "cpu_cores_median": {"2_nodes": cpu(2), "1_node": cpu(1)},
            "seconds": seconds,
            "connections": CONNECTIONS,
            "generator_processes": GENERATORS,
            "writer_connections": WRITERS,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "note": "every host and the load generators share the machine's 2 cores",
        },
        title="surge bench cluster: 2 API nodes vs 1, same cluster, through nginx",
    )
    if failovers:  # keep make cluster-test's figures (both modes) in the same file
        result.update(failovers)
        previous.write_text(json.dumps(result, indent=2) + "\n")


def main(quick: bool = False) -> None:
    common.run_async(lambda: measure(quick))


if __name__ == "__main__":
    main(quick=common.QUICK)
