"""`surge bench operations`: operations completed per second end to end — through the API,
the queue, the worker, the egress proxies and the provider simulator (latency 0) — against
the same flow written the plain way (``bench/_ops_plain.py``: one httpx call chain per job,
a login every time, no session cache), in the same run.

Each repetition, for each variant in alternating order: start the API (1 process) and the
worker fleet (2 processes × 8) on one embedded PostgreSQL + Redis, warm up, then POST N
renewals through the API from 16 concurrent clients (each with an ``Idempotency-Key``) and
time until the last one is decided. The simulator and 4 proxies run as their own processes
(started once). Also reported for ours: the provider-session cache hit ratio and upstream
logins per operation (from the simulator's own count).

    surge bench operations            # N = 300, 3 repetitions per variant
    surge bench operations --quick    # N = 60, 1 repetition per variant (smoke)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
from rich.progress import Progress

from bench.common import console, median, report
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-operations-secret-0123456789abcdef"
ACCOUNTS = {f"bench{i}": f"bench{i}-secret" for i in range(8)}
PROXIES = 4
CLIENTS = 16
PASSWORD = "bench-password-123"


def _env(database_url: str, redis_url: str, provider_url: str, plain: bool) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SURGE_ENV": "test",
        "SURGE_SECRET_KEY": SECRET,
        "SURGE_LOG_LEVEL": "WARNING",
        "SURGE_LOG_JSON": "true",
        "SURGE_LOG_ACCESS": "false",
        "SURGE_RATELIMIT_ENABLED": "false",
        "SURGE_JOBS_RATE_LIMITS": "",
        "SURGE_JOBS_POLL_INTERVAL": "PT0.05S",
        "SURGE_OPERATIONS_PROVIDER_URL": provider_url,
        "SURGE_AUTH_ARGON2_TIME_COST": "1",
        "SURGE_AUTH_ARGON2_MEMORY_KIB": "8192",
        "SURGE_AUTH_ARGON2_PARALLELISM": "1",
        "PYTHONPATH": str(ROOT),
    }
    if plain:
        env["SURGE_JOBS_MODULES"] = "bench._ops_plain"
    return env


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Fixture:
    """The servers, the fleet rows and a signed-in reseller with plenty of credit."""

    def __init__(self, database_url: str, redis_url: str, provider_url: str) -> None:
        from surge.config import Settings
        from surge.kit.runtime import Runtime

        self.settings = Settings(
            DATABASE_URL=database_url, REDIS_URL=redis_url, SECRET_KEY=SECRET, ENV="test",
            LOG_LEVEL="WARNING", OPERATIONS_PROVIDER_URL=provider_url,
            AUTH_ARGON2_TIME_COST=1, AUTH_ARGON2_MEMORY_KIB=8192, AUTH_ARGON2_PARALLELISM=1,
        )  # fmt: skip
        self.runtime = Runtime(self.settings)
        self.provider_url = provider_url
        self.email = f"bench-reseller-{uuid4().hex[:8]}@bench.surge.dev"

    async def start(self, proxy_urls: list[str]) -> None:
        from surge.identity.runtime import install_identity
        from surge.identity.service import identity as identity_service
        from surge.operations.service import operations as operations_service
        from surge.wallet.funds import funds as funds_service
        from surge.worker import discover

        discover(self.settings)
        install_identity(self.runtime)
        await self.runtime.start()
        async with self.runtime.db.session() as session:
            user = await identity_service.register(
                session, self.runtime, email=self.email, password=PASSWORD, role="reseller"
            )
            await funds_service.credit(
                session, user.id, amount=10**12, currency=self.settings.WALLET_CURRENCY,
                key=f"bench:{user.id}", kind="topup",
            )  # fmt: skip
            for username, password in ACCOUNTS.items():
                await operations_service.add_account(
                    session, self.runtime, username=username, password=password
                )
            for url in proxy_urls:
                await operations_service.add_proxy(session, self.runtime, url=url)

    async def decided(self) -> int:
        from sqlalchemy import text

        async with self.runtime.db.session() as session:
            value = await session.scalar(
                text("SELECT count(*) FROM operations WHERE status IN ('succeeded', 'failed')")
            )
        return int(value or 0)

    async def close(self) -> None:
        await self.runtime.stop()


async def _provider_logins(provider_url: str) -> int:
    async with httpx.AsyncClient(base_url=provider_url, trust_env=False) as client:
        state = (await client.get("/_control/state")).json()
    return int(state["logins"])


async def _one_variant(
    fx: Fixture, database_url: str, redis_url: str, *, plain: bool, n: int
) -> dict[str, float]:
    env = _env(database_url, redis_url, fx.provider_url, plain)
    port = free_port()
    python = sys.executable
    procs = [
        _spawn([python, "-m", "surge.cli", "serve", "--no-servers", "--workers", "1",
                "--host", "127.0.0.1", "--port", str(port)], env),
        _spawn([python, "-m", "surge.cli", "worker", "--no-servers", "--processes", "2",
                "--concurrency", "8"], env),
    ]  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        base = f"http://127.0.0.1:{port}"
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as api:
            for _ in range(100):
                login = await api.post(
                    "/api/v1/auth/login", json={"email": fx.email, "password": PASSWORD}
                )
                if login.status_code == 200:
                    break
                await asyncio.sleep(0.2)
            headers = {"Authorization": f"Bearer {login.json()['access_token']}"}

            async def post(i: int) -> None:
                body = {"kind": "renew", "card": f"{4000000000 + i}", "package": "basic",
                        "months": 1}  # fmt: skip
                response = await api.post(
                    "/api/v1/operations", json=body,
                    headers={**headers, "Idempotency-Key": str(uuid4())},
                )  # fmt: skip
                response.raise_for_status()

            posted: list[float] = []

            async def run(count: int) -> float:
                start_done = await fx.decided()
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(count):
                    queue.put_nowait(i)

                async def client() -> None:
                    while not queue.empty():
                        await post(queue.get_nowait())

                started = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(CLIENTS)))
                posted.append(time.perf_counter() - started)
                while await fx.decided() < start_done + count:
                    if time.perf_counter() - started > 600:
                        raise TimeoutError("operations not decided within 10 minutes")
                    await asyncio.sleep(0.02)
                return time.perf_counter() - started

            await run(max(8, n // 10))  # warm-up: connections, sessions, JIT-free caches
            logins_before = await _provider_logins(fx.provider_url)
            elapsed = await run(n)
            logins = await _provider_logins(fx.provider_url) - logins_before
    finally:
        _stop(procs)
    return {"ops_per_s": n / elapsed, "logins_per_op": logins / n, "accepted_per_s": n / posted[-1]}


async def _run(quick: bool) -> dict[str, Any]:
    n = 60 if quick else 300
    reps = 1 if quick else 3
    python = sys.executable
    results: dict[str, list[dict[str, float]]] = {"surge": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="surge-bench-ops-") as folder:
        pg = EmbeddedPostgres(Path(folder) / "pg", durable=True)
        redis = EmbeddedRedis(Path(folder) / "redis")
        database_url = pg.start()
        redis_url = redis.start()
        sim_port, proxy_port = free_port(), free_port()
        accounts = ",".join(f"{u}:{p}" for u, p in ACCOUNTS.items())
        sims = [
            _spawn([python, "-m", "surge.sim.provider", "--host", "127.0.0.1", "--port",
                    str(sim_port), "--accounts", accounts], dict(os.environ)),
            _spawn([python, "-m", "surge.sim.proxies", "--host", "127.0.0.1", "--port",
                    str(proxy_port), "--count", str(PROXIES), "--listen-port",
                    str(proxy_port)], dict(os.environ)),
        ]  # fmt: skip
        fx: Fixture | None = None
        try:
            from surge.kit.db import migrate

            await asyncio.to_thread(migrate.upgrade, database_url)
            wait_for_port("127.0.0.1", sim_port, timeout=20)
            wait_for_port("127.0.0.1", proxy_port, timeout=20)
            proxy_urls = [f"http://127.0.1.{i + 1}:{proxy_port}" for i in range(PROXIES)]
            fx = Fixture(database_url, redis_url, f"http://127.0.0.1:{sim_port}")
            await fx.start(proxy_urls)
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("operations bench", total=reps * 2)
                for rep in range(reps):
                    order = [False, True] if rep % 2 == 0 else [True, False]
                    for plain in order:
                        name = "plain" if plain else "surge"
                        measured = await _one_variant(fx, database_url, redis_url, plain=plain, n=n)
                        results[name].append(measured)
                        console.print(
                            f"rep {rep + 1}/{reps} {name:6s} {measured['ops_per_s']:7.1f} ops/s  "
                            f"logins/op {measured['logins_per_op']:.3f}  "
                            f"(API accepted {measured['accepted_per_s']:.1f}/s)"
                        )
                        progress.advance(task)
        finally:
            if fx is not None:
                await fx.close()
            _stop(sims)
            redis.stop()
            pg.stop()
    return {"results": results, "n": n, "reps": reps}


def main(quick: bool = False) -> None:
    data = asyncio.run(_run(quick))
    res = data["results"]
    ours_rate = median([r["ops_per_s"] for r in res["surge"]])
    base_rate = median([r["ops_per_s"] for r in res["plain"]])
    ours_logins = median([r["logins_per_op"] for r in res["surge"]])
    base_logins = median([r["logins_per_op"] for r in res["plain"]])
    ratio = ours_rate / base_rate if base_rate else 0.0
    report(
        "operations",
        ours={
            "ops_per_s": round(ours_rate, 1),
            "logins_per_op": round(ours_logins, 4),
            "session_cache_hit_ratio": round(max(0.0, 1 - ours_logins), 4),
        },
        baseline={
            "ops_per_s": round(base_rate, 1),
            "logins_per_op": round(base_logins, 4),
            "session_cache_hit_ratio": round(max(0.0, 1 - base_logins), 4),
        },
        ratio=ratio,
        target=">= 1.0 (faster than the plain way) with fewer logins per operation",
        ok=ratio >= 1.0 and ours_logins < base_logins,
        rows=[
            ("operations/s (median)", f"{ours_rate:.1f}", f"{base_rate:.1f}"),
            ("upstream logins / operation", f"{ours_logins:.3f}", f"{base_logins:.3f}"),
            ("session-cache hit ratio", f"{max(0.0, 1 - ours_logins):.3f}", "0 (no cache)"),
        ],
        extra={
            "n": data["n"],
            "reps": data["reps"],
            "runs": res,
            "clients": CLIENTS,
            "fleet": "1 API process, 2 worker processes x 8",
            "proxies": PROXIES,
            "provider_latency_ms": 0,
        },
        title="surge bench operations (end to end, simulator latency 0)",
    )


if __name__ == "__main__":
    main()
