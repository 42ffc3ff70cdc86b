"""`surge bench payments`: provider webhooks processed per second end to end — signature
verified, event stored in the inbox, processing job run, ledger posting committed — against
the same verification and posting done inline in the request handler, in the same run.

Setup: an embedded PostgreSQL (durable: fsync on) and Redis; one server process
(``bench._payments_inline``: Surge's app plus the inline baseline route) and one
``surge.worker`` process on the ``payments`` queue (concurrency 8). The driver signs
``EVENTS`` ``payment_intent.succeeded`` events (Stripe-Signature, HMAC-SHA256) for 200
owners and POSTs them from ``CLIENTS`` concurrent keep-alive connections:

- **surge** (the inbox path): the clock stops when the last of the events' postings is
  committed (polled in the ledger every 20 ms), so it includes the job; the rate at which
  the endpoint *acknowledged* them is reported too;
- **inline** (the baseline): the clock stops when the last response came back (each
  response means verified and posted).

The two alternate for several repetitions (fresh event and payment ids each time); medians
are reported. Both share the hot ``payments`` system account (every credit debits it), as
production does. Target: surge ≥ 0.5 × inline — the inbox does about three times the writes
(event row, job row, top-up row, then the posting) and buys ordering, retries, dead letters
and a fast acknowledgement for them; the ratio says what that costs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from rich.progress import Progress
from sqlalchemy import text

from bench._loadgen import ROOT, stop_servers, uvicorn_server, wait_ready
from bench.common import console, median, report
from surge.kit.db import Database, PoolConfig, migrate
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from surge.kit.security import webhooks

SECRET = "whsec_bench"
CLIENTS = 32
OWNERS = [uuid.uuid4() for _ in range(200)]
TARGET = 0.5
#: A drain that posts nothing for this long is stuck (the jobs retry after 1-2 s, leases
#: are renewed every 30 s); one that keeps posting, however slowly, is measured.
STUCK_AFTER = 120.0


def _events(count: int) -> list[tuple[str, bytes]]:
    """``count`` signed-ready bodies: (payment id, raw JSON)."""
    out = []
    for i in range(count):
        payment_id = f"pi_bench_{uuid.uuid4().hex}"
        owner = OWNERS[i % len(OWNERS)]
        event = {
            "id": f"evt_{uuid.uuid4().hex}",
            "object": "event",
            "type": "payment_intent.succeeded",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": payment_id,
                    "object": "payment_intent",
                    "amount": 1_000 + i,
                    "amount_received": 1_000 + i,
                    "currency": "usd",
                    "status": "succeeded",
                    "metadata": {"topup_id": str(uuid.uuid4()), "owner_id": str(owner)},
                }
            },
        }
        out.append((payment_id, json.dumps(event, separators=(",", ":")).encode()))
    return out


async def _send(url: str, bodies: list[bytes]) -> float:
    """POST every body from CLIENTS connections; returns the seconds until the last answer."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    errors = 0
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)

    async def sender(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while not queue.empty():
            body = queue.get_nowait()
            signature = webhooks.header([SECRET], body, int(time.time()))
            response = await client.post(
                url,
                content=body,
                headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
            )
            errors += response.status_code != 200

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(sender(client) for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{errors} webhooks were not accepted")
    return elapsed


async def _posted(db: Database, keys: list[str]) -> int:
    async with db.session() as session:
        count = await session.scalar(
            text("SELECT count(*) FROM wallet_transfers WHERE idempotency_key = ANY(:k)"),
            {"k": keys},
        )
    return int(count or 0)


async def _where_it_stands(db: Database, payment_ids: list[str]) -> dict[str, Any]:
    """What a drain that does not end is waiting for: this run's inbox events by state (and
    their last errors), its jobs by state, stalls and last errors."""
    async with db.session() as session:
        events = (
            await session.execute(
                text(
                    "SELECT state, count(*), max(attempts), min(last_error) FROM payment_events "
                    "WHERE payment_id = ANY(:p) GROUP BY state"
                ),
                {"p": payment_ids},
            )
        ).all()
        jobs = (
            await session.execute(
                text(
                    "SELECT state, count(*), sum(stalls), max(attempts), min(last_error), "
                    "min(run_at) FROM jobs WHERE lock_key = ANY(:k) GROUP BY state"
                ),
                {"k": [f"payment:{p}" for p in payment_ids]},
            )
        ).all()
    return {
        "events": {r[0]: {"count": r[1], "attempts": r[2], "error": r[3]} for r in events},
        "jobs": {
            r[0]: {"count": r[1], "stalls": r[2], "attempts": r[3], "error": r[4],
                   "next_run": str(r[5])}
            for r in jobs
        },
    }  # fmt: skip


def _alive(procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{' '.join(map(str, proc.args[:4]))} exited with {proc.returncode} "  # type: ignore[index]
                f"mid-run; logs in {logs}"
            )


async def _surge_run(
    base: str, db: Database, count: int, procs: list[subprocess.Popen[bytes]], logs: Path
) -> tuple[float, float]:
    """(end-to-end events/s, acknowledged events/s) through the inbox path."""
    events = _events(count)
    keys = [f"payment:{pi}" for pi, _ in events]
    started = time.perf_counter()
    acked = await _send(f"{base}/api/v1/webhooks/payments", [body for _, body in events])
    last, moved_at = -1, time.perf_counter()
    while (posted := await _posted(db, keys)) < count:
        _alive(procs, logs)  # a dead worker is said at once
        now = time.perf_counter()
        if posted != last:
            last, moved_at = posted, now
        elif now - moved_at > STUCK_AFTER:
            # Stuck, not slow: a drain starved of CPU still posts (ADR 0053); one that
            # posts nothing for this long waits for something that will not come.
            stands = await _where_it_stands(db, [pi for pi, _ in events])
            raise TimeoutError(
                f"the inbox stopped draining: {posted}/{count} posted, none in the last "
                f"{STUCK_AFTER:.0f} s; {stands}; logs in {logs}"
            )
        await asyncio.sleep(0.02)
    return count / (time.perf_counter() - started), count / acked


async def _inline_run(base: str, db: Database, count: int) -> float:
    events = _events(count)
    elapsed = await _send(f"{base}/bench/webhooks/inline", [body for _, body in events])
    assert await _posted(db, [f"payment:{pi}" for pi, _ in events]) == count
    return count / elapsed


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The worker, its warnings and errors kept in ``log`` (a stall must leave a trace)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "surge.worker", "--queues", "payments", "--concurrency", "8"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def _bench(quick: bool) -> dict[str, Any]:
    count, reps = (300, 2) if quick else (2_000, 5)
    folder = Path(tempfile.mkdtemp(prefix="surge-bench-payments-"))
    pg = EmbeddedPostgres(folder / "pg", durable=True)
    redis = EmbeddedRedis(folder / "redis")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with console.status("Starting PostgreSQL, Redis, the API and a worker..."):
            pg.start()
            redis.start()
            await asyncio.to_thread(migrate.upgrade, pg.url)
            metrics_dir = folder / "metrics"
            metrics_dir.mkdir()
            env = {
                **os.environ,
                "DATABASE_URL": pg.url,
                "REDIS_URL": redis.url,
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                "PYTHONPATH": str(ROOT),
                "SURGE_LOG_LEVEL": "WARNING",
                "SURGE_LOG_JSON": "true",
                "SURGE_PAYMENTS_WEBHOOK_SECRETS": SECRET,
                "SURGE_RATELIMIT_ENABLED": "false",
                "SURGE_DB_SLOW_QUERY": "PT60S",
                "SURGE_JOBS_POLL_INTERVAL": "PT0.02S",
            }
            port = free_port()
            procs.append(
                uvicorn_server(
                    "bench._payments_inline:create_app",
                    port,
                    env,
                    workers=1,
                    factory=True,
                    log=folder / "server.log",
                )
            )
            procs.append(_worker(env, folder / "worker.log"))
            base = f"http://127.0.0.1:{port}"
            wait_ready(f"{base}/livez", procs[0])
        db = Database(pg.url, config=PoolConfig(max_size=4, min_size=1, slow_query=60))
        await db.start()
        try:
            await _surge_run(
                base, db, 100, procs, folder
            )  # warm-up: imports, plans, pools (not measured)
            await _inline_run(base, db, 100)
            ours: list[float] = []
            acked: list[float] = []
            inline: list[float] = []
            with Progress(console=console) as progress:
                task = progress.add_task(
                    f"{reps} × (surge, inline), {count} webhooks each", total=reps * 2
                )
                for rep in range(reps):
                    order = ["surge", "inline"] if rep % 2 == 0 else ["inline", "surge"]
                    for name in order:
                        if name == "surge":
                            end_to_end, ack = await _surge_run(base, db, count, procs, folder)
                            ours.append(end_to_end)
                            acked.append(ack)
                        else:
                            inline.append(await _inline_run(base, db, count))
                        progress.advance(task)
        finally:
            await db.close()
    except BaseException:
        console.print(f"[red]payments bench failed; the server's and worker's logs: {folder}")
        raise
    finally:
        stop_servers(procs)
        redis.stop()
        pg.stop()
    return {"ours": ours, "acked": acked, "inline": inline, "count": count, "reps": reps}


def main(quick: bool = False) -> None:
    data = asyncio.run(_bench(quick))
    ours, acked, inline = median(data["ours"]), median(data["acked"]), median(data["inline"])
    ratio = ours / inline if inline else 0.0
    report(
        "payments",
        ours={"webhooks_per_s_end_to_end": round(ours, 1), "acknowledged_per_s": round(acked, 1)},
        baseline={"webhooks_per_s_inline": round(inline, 1)},
        ratio=ratio,
        target=f"end-to-end ≥ {TARGET} × inline",
        ok=ratio >= TARGET,
        rows=[
            ("webhooks/s end to end (verify → inbox → job → posting)", f"{ours:,.0f}", "—"),
            ("webhooks/s acknowledged by the endpoint", f"{acked:,.0f}", "—"),
            ("webhooks/s verified and posted inline", "—", f"{inline:,.0f}"),
            ("ratio (end to end / inline)", f"{ratio:.2f}", f"≥ {TARGET}"),
        ],
        extra={
            "runs": {
                "surge": data["ours"],
                "acknowledged": data["acked"],
                "inline": data["inline"],
            },
            "webhooks_per_run": data["count"],
            "repetitions": data["reps"],
            "clients": CLIENTS,
            "owners": len(OWNERS),
            "server": "1 uvicorn process",
            "worker": "1 process × 8",
            "postgres": "embedded, durable (fsync on)",
        },
        title="surge bench payments — inbox path vs inline posting, same server",
    )


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
