"""`surge bench privileges`: seed 003's privilege checks, measured three ways in one run.

(a) ``has_privilege`` in-process from the memory tier, versus one raw Redis GET of the same
    entry (the tier below it; seed 003 budgets 1-5 ms for it) — same process, same Redis.
(b) ``GET /api/v1/me/privileges`` (JWT check, revocation check, plan-aware rate limiter,
    privileges from memory) versus ``GET /livez`` on the *same* server, alternated run by
    run. The load comes from ``CALLERS`` signed-in users taking turns (one request each in
    rotation), so every batch of rate-limit decisions carries that many distinct keys; the
    ``/livez`` runs send the same rotating ``Authorization`` headers (the load generator does
    the same work for both, and ``/livez`` ignores them). Target: requests/s ratio ≥ 0.8
    (issue 17; it was 0.6 in issue 7).
(c) ``POST /api/v1/privileges/batch`` with 100 users, warm, p50 over HTTP (seed 003 reports
    30 ms; target ≤ 5 ms); beside it, in-process, the batch from memory versus the one SQL
    query that answers it from PostgreSQL without any cache.

Servers: an embedded PostgreSQL and Redis started in a temporary folder; Surge under uvicorn
with 2 workers (uvloop + httptools, with Surge's one-write protocol as ``surge serve``), rate limiting *on* with limits too high to trigger (its
cost is part of the measurement). Load: wrk (2 threads, 64 connections) when installed, else
a bundled closed-loop generator that can send the Authorization header.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pyotp
from sqlalchemy import text

from bench._loadgen import (
    CONNECTIONS,
    generator_name,
    load,
    stop_servers,
    uvicorn_server,
    wait_ready,
)
from bench.common import console, median, percentile, report
from surge.config import Settings
from surge.kit.db import migrate
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from surge.kit.security import PasswordHasher
from surge.kit.web.protocol import PROTOCOL

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
#: Issue 17: /me/privileges at ≥ 0.8 of /livez's requests/s on the same server (ADR 0023).
TARGET = 0.8
USERS = 5000
#: Distinct signed-in users the (b) load comes from (one per wrk connection).
CALLERS = 64
PASSWORD = "bench-password-bench-password"
ADMIN_SECRET = pyotp.random_base32()
#: Limits nobody reaches in a bench run: the limiter still runs (every request waits for its
#: decision; concurrent decisions share one Redis round trip, ADR 0006).
HIGH_LIMITS = [
    {"name": "bench-subject", "limit": 10**8, "period": "PT1H", "per": "subject"},
    {"name": "bench-ip", "limit": 10**8, "period": "PT1H", "per": "ip"},
]


# ---- load generation ------------------------------------------------------------------------


# ---- setup ----------------------------------------------------------------------------------


async def _seed(database_url: str) -> tuple[list[str], str]:
    """USERS users (a third on paid plans), one admin with MFA; the view refreshed."""
    from sqlalchemy.ext.asyncio import create_async_engine

    password_hash = PasswordHasher().hash_sync(PASSWORD)  # the server's default parameters
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO users (email, password_hash, role) "
                    "SELECT 'user' || g || '@bench.test', :h, 'user' FROM generate_series(1, :n) g"
                ),
                {"h": password_hash, "n": USERS},
            )
            await conn.execute(
                text(
                    "INSERT INTO users (email, password_hash, role, mfa_secret, mfa_enabled) "
                    "VALUES ('admin@bench.test', :h, 'admin', :s, true)"
                ),
                {"h": password_hash, "s": ADMIN_SECRET},
            )
            await conn.execute(
                text(
                    "INSERT INTO subscriptions (user_id, plan, expires_at) "
                    "SELECT id, (ARRAY['plus', 'pro', 'ultra'])[1 + (abs(hashtext(id::text)) % 3)], "
                    "now() + interval '30 days' FROM users "
                    "WHERE role = 'user' AND abs(hashtext(email)) % 3 = 0"
                )
            )
            await conn.execute(text("REFRESH MATERIALIZED VIEW active_subscriptions"))
            await conn.execute(text("UPDATE view_refreshes SET refreshed_at = now()"))
            ids = (
                (await conn.execute(text("SELECT id::text FROM users WHERE role = 'user'")))
                .scalars()
                .all()
            )
    finally:
        await engine.dispose()
    return list(ids), password_hash


def _login(base: str, email: str, otp: str | None = None) -> str:
    body: dict[str, Any] = {"email": email, "password": PASSWORD}
    if otp:
        body["otp"] = otp
    # 60 s: 64 argon2 logins at start-up take longer than 10 s on a busy 2-core machine.
    response = httpx.post(f"{base}/api/v1/auth/login", json=body, timeout=60)
    response.raise_for_status()
    return str(response.json()["access_token"])


async def _in_process(
    database_url: str, redis_url: str, user_ids: list[str], reps: int, calls: int
) -> dict[str, Any]:
    from surge.identity import repository
    from surge.identity.runtime import install_identity
    from surge.identity.service import identity as identity_service
    from surge.kit.runtime import Runtime

    settings = Settings(DATABASE_URL=database_url, REDIS_URL=redis_url, LOG_LEVEL="WARNING")
    runtime = Runtime(settings)
    await runtime.start()
    identity = install_identity(runtime)
    await identity.start(warm=False, refresh_view=False)
    try:
        uid = uuid.UUID(user_ids[0])
        await identity_service.has_privilege(runtime, uid, "export")  # into memory and Redis
        l2_key = next(iter(await runtime.redis.raw.keys(f"surge:identity:priv:*{uid}")), None)
        assert l2_key is not None
        redis_client = runtime.redis.raw
        batch = [uuid.UUID(u) for u in user_ids[100:200]]
        await identity.privileges.get_many(batch)
        check_us: list[float] = []
        redis_us: list[float] = []
        batch_mem_ms: list[float] = []
        batch_sql_ms: list[float] = []
        for _ in range(reps):
            started = time.perf_counter()
            for _ in range(calls):
                await identity_service.has_privilege(runtime, uid, "export")
            check_us.append((time.perf_counter() - started) / calls * 1e6)
            started = time.perf_counter()
            for _ in range(calls // 10):
                await redis_client.get(l2_key)
            redis_us.append((time.perf_counter() - started) / (calls // 10) * 1e6)
            for _ in range(50):
                started = time.perf_counter()
                await identity.privileges.get_many(batch)
                batch_mem_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                async with runtime.db.read_session() as session:
                    await repository.grants(session, batch)
                batch_sql_ms.append((time.perf_counter() - started) * 1000)
        return {
            "check_us": median(check_us),
            "check_runs_us": [round(v, 2) for v in check_us],
            "redis_get_us": median(redis_us),
            "batch_memory_p50_ms": median(batch_mem_ms),
            "batch_sql_p50_ms": median(batch_sql_ms),
        }
    finally:
        await identity.close()
        await runtime.stop()


def _batch_http(base: str, token: str, user_ids: list[str], requests: int) -> dict[str, float]:
    body = {"user_ids": user_ids[:100], "feature": "api_access"}
    headers = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        for _ in range(5):  # warm: every entry in both workers' memory
            client.post("/api/v1/privileges/batch", json=body).raise_for_status()
        for _ in range(requests):
            started = time.perf_counter()
            response = client.post("/api/v1/privileges/batch", json=body)
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
    return {"p50_ms": median(latencies), "p99_ms": percentile(latencies, 99)}


# ---- main -----------------------------------------------------------------------------------


def main(quick: bool = False) -> None:
    reps, seconds = (2, 2.0) if quick else (5, 6.0)
    folder = Path(tempfile.mkdtemp(prefix="surge-bench-privileges-"))
    pg = EmbeddedPostgres(folder / "pg")
    redis = EmbeddedRedis(folder / "redis")
    procs: list[subprocess.Popen[bytes]] = []
    ours: list[dict[str, float]] = []
    base: list[dict[str, float]] = []
    ours_nolimit: list[dict[str, float]] = []
    base_nolimit: list[dict[str, float]] = []
    try:
        with console.status("Starting PostgreSQL, Redis and Surge; seeding users..."):
            pg.start()
            redis.start()
            migrate.upgrade(pg.url)
            user_ids, _ = asyncio.run(_seed(pg.url))
            metrics_dir = folder / "metrics"
            metrics_dir.mkdir()
            env = {
                **os.environ,
                "DATABASE_URL": pg.url,
                "REDIS_URL": redis.url,
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                "SURGE_LOG_LEVEL": "WARNING",
                "SURGE_RATELIMIT_POLICIES": json.dumps(HIGH_LIMITS),
                "PYTHONPATH": str(ROOT),
            }
            port, port_nolimit = free_port(), free_port()
            procs.append(
                uvicorn_server(
                    "surge.app:create_app", port, env, workers=WORKERS, factory=True, http=PROTOCOL
                )
            )
            # The same app with the rate limiter off: how much of (b) is the limiter's.
            nolimit_dir = folder / "metrics-nolimit"
            nolimit_dir.mkdir()
            procs.append(
                uvicorn_server(
                    "surge.app:create_app",
                    port_nolimit,
                    {**env, "SURGE_RATELIMIT_ENABLED": "false",
                     "PROMETHEUS_MULTIPROC_DIR": str(nolimit_dir)},
                    workers=WORKERS, factory=True, http=PROTOCOL,
                )
            )  # fmt: skip
            url, url_nolimit = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port_nolimit}"
            wait_ready(f"{url}/readyz", procs[0])
            wait_ready(f"{url_nolimit}/readyz", procs[1])
            with ThreadPoolExecutor(8) as pool:  # ~0.1 s of argon2 each, 2 workers
                user_tokens = list(
                    pool.map(lambda i: _login(url, f"user{i}@bench.test"), range(1, CALLERS + 1))
                )
            admin_token = _login(url, "admin@bench.test", pyotp.TOTP(ADMIN_SECRET).now())
        console.print("(a) + in-process batch ...")
        local = asyncio.run(
            _in_process(pg.url, redis.url, user_ids, reps=reps, calls=20_000 if quick else 100_000)
        )
        console.print("(c) batch of 100 over HTTP ...")
        batch = _batch_http(url, admin_token, user_ids, 100 if quick else 400)
        privileges_url, livez_url = f"{url}/api/v1/me/privileges", f"{url}/livez"
        privileges_nl, livez_nl = f"{url_nolimit}/api/v1/me/privileges", f"{url_nolimit}/livez"
        for warm_url in (privileges_url, livez_url, privileges_nl, livez_nl):
            load(warm_url, 1 if quick else 2, tokens=user_tokens)  # warm both workers, every path
        from rich.progress import Progress

        with Progress(console=console) as progress:
            task = progress.add_task(
                f"(b) {reps} × (/me/privileges, /livez) × (limiter on, off), {seconds:.0f}s each",
                total=reps * 4,
            )
            for _ in range(reps):
                ours.append(load(privileges_url, seconds, tokens=user_tokens))
                progress.advance(task)
                base.append(load(livez_url, seconds, tokens=user_tokens))
                progress.advance(task)
                ours_nolimit.append(load(privileges_nl, seconds, tokens=user_tokens))
                progress.advance(task)
                base_nolimit.append(load(livez_nl, seconds, tokens=user_tokens))
                progress.advance(task)
    finally:
        stop_servers(procs)
        redis.stop()
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)

    ratios = [o["rps"] / b["rps"] for o, b in zip(ours, base, strict=True)]
    ratio = median(ratios)
    ours_rps, base_rps = median([o["rps"] for o in ours]), median([b["rps"] for b in base])
    ours_p99, base_p99 = median([o["p99_ms"] for o in ours]), median([b["p99_ms"] for b in base])
    ratio_nolimit = median(
        [o["rps"] / b["rps"] for o, b in zip(ours_nolimit, base_nolimit, strict=True)]
    )
    nl_rps = median([o["rps"] for o in ours_nolimit])
    nl_base = median([b["rps"] for b in base_nolimit])
    errors = sum(r["errors"] for r in (*ours, *base, *ours_nolimit, *base_nolimit))
    ok = ratio >= TARGET and batch["p50_ms"] <= 5.0 and errors == 0
    report(
        "privileges",
        ours={
            "me_privileges_rps": round(ours_rps), "me_privileges_p99_ms": round(ours_p99, 2),
            "runs_rps": [round(o["rps"]) for o in ours],
            "has_privilege_memory_us": round(local["check_us"], 2),
            "batch100_http_p50_ms": round(batch["p50_ms"], 2),
            "batch100_http_p99_ms": round(batch["p99_ms"], 2),
            "batch100_in_process_p50_ms": round(local["batch_memory_p50_ms"], 3),
        },
        baseline={
            "livez_rps": round(base_rps), "livez_p99_ms": round(base_p99, 2),
            "runs_rps": [round(b["rps"]) for b in base],
            "redis_get_us": round(local["redis_get_us"], 2),
            "batch100_sql_no_cache_p50_ms": round(local["batch_sql_p50_ms"], 3),
            "seed_003_batch_ms": 30,
            "what": "GET /livez on the same server; raw Redis GET; one SQL query; seed 003's figure",
        },
        ratio=ratio,
        target=f"rps ratio ≥ {TARGET} and batch-100 p50 ≤ 5 ms",
        ok=ok,
        rows=[
            ("(a) has_privilege, memory tier (µs/call)", f"{local['check_us']:.2f}",
             f"{local['redis_get_us']:.1f} (one Redis GET)"),
            ("(b) requests/s (median)", f"{ours_rps:,.0f}", f"{base_rps:,.0f} (/livez)"),
            ("(b) p99 ms (median)", f"{ours_p99:.2f}", f"{base_p99:.2f}"),
            ("(b) rps ratio of paired runs (median)", f"{ratio:.3f}", f"target ≥ {TARGET}"),
            ("(b) same, rate limiter off: rps", f"{nl_rps:,.0f}", f"{nl_base:,.0f} (/livez)"),
            ("(b) same, rate limiter off: ratio", f"{ratio_nolimit:.3f}", "(the limiter's share)"),
            ("(c) batch of 100, HTTP p50 ms", f"{batch['p50_ms']:.2f}", "30 (seed 003), target ≤ 5"),
            ("(c) batch of 100, in-process p50 ms", f"{local['batch_memory_p50_ms']:.3f}",
             f"{local['batch_sql_p50_ms']:.3f} (one SQL query, no cache)"),
        ],
        extra={
            "workers": WORKERS, "connections": CONNECTIONS, "seconds_per_run": seconds,
            "reps": reps, "users": USERS, "callers": CALLERS, "errors": errors,
            "load_generator": generator_name(),
            "paired_ratios": [round(r, 3) for r in ratios],
            "limiter_off": {
                "me_privileges_rps": round(nl_rps), "livez_rps": round(nl_base),
                "ratio": round(ratio_nolimit, 3),
                "runs_rps": [round(o["rps"]) for o in ours_nolimit],
            },
            "rate_limiter": "on, limits out of reach (its Redis call is in the measurement)",
        },
        title="surge bench privileges — seed 003 privilege checks",
    )  # fmt: skip


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
