"""The load of ``surge bench cluster``: closed-loop privilege reads and wallet transfers over
``bench.load``'s generator pieces, in several spawned processes (issue 18).

One process of Python cannot load two API nodes: the single-process httpx generator of the
first smoke run topped out near 210 requests/s, below what one node serves. Here each
generator process runs ``bench.load.client.Connection`` (the raw-protocol keep-alive client
of ``surge load``) on uvloop, in ``spawn`` children that share one start instant, like
``bench.load.runner.closed`` — which only sends GETs, hence this mix: each connection sends
its next request as soon as the previous answer is read. ``writer_connections`` of the
connections send withdrawals (``POST /api/v1/withdrawals``, a ledger transfer each, a fresh
``Idempotency-Key`` each), the others privilege reads (``GET /api/v1/me/privileges``,
prebuilt bytes per caller). Readers and writers have their own connections because the
two are bound by different tiers: every withdrawal credits the one ``holds`` system account
and waits for a synchronous commit, so in a per-request mix the readers' throughput would be
set by the writers' latency, not by the API nodes. Latencies go into HdrHistograms, per
kind, encoded back to the parent.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.load.client import Connection, ConnectionLost, build_request
from bench.load.engine import new_histogram

KINDS = ("read", "transfer")


@dataclass
class MixPlan:
    host: str
    port: int
    connections: int
    seconds: float
    #: Bearer tokens of every caller (reads) and of the partners (withdrawals).
    readers: list[str]
    writers: list[str]
    #: How many of ``connections`` send withdrawals (the others send reads).
    writer_connections: int
    #: ``time.time()`` of the window's first request (the same for every process).
    start_epoch: float
    seed: int
    amount: int = 1_000
    timeout: float = 10.0


def _withdrawal(host: str, token: str, amount: int) -> bytes:
    body = b'{"amount": %d}' % amount
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "Idempotency-Key": uuid.uuid4().hex}  # fmt: skip
    return build_request("POST", "/api/v1/withdrawals", host, headers, body)


async def _mix_main(plan: MixPlan) -> dict[str, Any]:
    host = f"{plan.host}:{plan.port}"
    reads = [build_request("GET", "/api/v1/me/privileges", host,
                           {"Authorization": f"Bearer {t}"}) for t in plan.readers]  # fmt: skip
    histograms = {kind: new_histogram() for kind in KINDS}
    ok = dict.fromkeys(KINDS, 0)
    statuses: dict[str, int] = {}
    connections = [Connection(plan.host, plan.port) for _ in range(plan.connections)]
    await asyncio.gather(*(c.connect() for c in connections))
    start = time.perf_counter() + max(0.0, plan.start_epoch - time.time())
    stop_at = start + plan.seconds
    delay = start - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)

    async def loop(index: int, connection: Connection) -> None:
        rng = random.Random(plan.seed * 1_000_003 + index)
        perf = time.perf_counter
        writer = index < plan.writer_connections
        while (began := perf()) < stop_at:
            if writer:
                kind, raw = "transfer", _withdrawal(host, rng.choice(plan.writers), plan.amount)
            else:
                kind, raw = "read", rng.choice(reads)
            try:
                async with asyncio.timeout(plan.timeout):
                    response = await connection.request(raw)
                status = str(response.status)
            except (TimeoutError, ConnectionLost, OSError):
                connection.close()
                status = "no answer"
            histograms[kind].record_value(max(1, int((perf() - began) * 1e6)))
            key = f"{kind} {status}"
            statuses[key] = statuses.get(key, 0) + 1
            if status.startswith("2"):
                ok[kind] += 1

    await asyncio.gather(*(loop(i, c) for i, c in enumerate(connections)))
    elapsed = time.perf_counter() - start
    for connection in connections:
        connection.close()
    return {"ok": ok, "statuses": statuses, "elapsed": elapsed,
            "histograms": {k: h.encode() for k, h in histograms.items()}}  # fmt: skip


def run_mix(plan: MixPlan) -> dict[str, Any]:
    """Entry point of a generator process (picklable in, picklable out)."""
    import uvloop

    return uvloop.run(_mix_main(plan))


class MixLoad:
    """``processes`` generator interpreters, started once and reused for every window."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        for warm in [self._pool.submit(time.sleep, 0.3) for _ in range(processes)]:
            warm.result()  # every interpreter up before a clock starts

    def pids(self) -> list[int]:
        """The generator processes (their CPU is reported beside the hosts')."""
        return list(self._pool._processes or {})

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def window(
        self,
        host: str,
        port: int,
        *,
        readers: list[str],
        writers: list[str],
        seconds: float,
        connections: int,
        writer_connections: int,
        seed: int,
    ) -> dict[str, Any]:
        """Requests that succeeded per second by kind, p50/p99 per kind, every status."""

        def split(total: int) -> list[int]:
            return [total // self.processes + (1 if i < total % self.processes else 0)
                    for i in range(self.processes)]  # fmt: skip

        start = time.time() + 1.0
        shares = zip(split(connections), split(writer_connections), strict=True)
        plans = [
            MixPlan(host, port, n, seconds, readers, writers, w, start, seed * 97 + i)
            for i, (n, w) in enumerate(shares)
            if n
        ]
        futures = [self._pool.submit(run_mix, plan) for plan in plans]
        results = [f.result() for f in futures]
        elapsed = max(float(r["elapsed"]) for r in results)
        out: dict[str, Any] = {"seconds": round(elapsed, 2), "statuses": {}}
        for kind in KINDS:
            histogram = new_histogram()
            for result in results:
                histogram.decode_and_add(result["histograms"][kind])
            done = sum(int(r["ok"][kind]) for r in results)
            out[f"{kind}s_per_s"] = round(done / elapsed, 1)
            out[f"{kind}_p50_ms"] = round(histogram.get_value_at_percentile(50) / 1000, 2)
            out[f"{kind}_p99_ms"] = round(histogram.get_value_at_percentile(99) / 1000, 2)
        for result in results:
            for key, count in result["statuses"].items():
                out["statuses"][key] = out["statuses"].get(key, 0) + count
        out["errors"] = sum(c for k, c in out["statuses"].items() if k.split()[1][0] != "2")
        return out
