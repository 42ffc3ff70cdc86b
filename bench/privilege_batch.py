"""CPU of one privilege batch check in the web process, by the tier that answers (issue 19).

A batch of 50 users drawn from a population mostly not in memory costs the web process CPU
for every tier it touches: PostgreSQL (cold: neither memory nor Redis holds them), Redis
(this process's memory dropped), memory. Measured in process against real PostgreSQL and
Redis with ``time.process_time()`` around each ``PrivilegeStore.get_many`` call, so the
figure is this process's CPU only (the servers' work is theirs) and holds on a busy machine.
The baseline is another 50 users' grants query alone (``repository.grants``: what any batch
load must at least pay), measured in the same run.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.common import console, median, report
from surge.config import Settings
from surge.kit.db import migrate
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis

USERS = 30_000
BATCH = 50


async def _seed(database_url: str) -> list[uuid.UUID]:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO users (email, password_hash, role) "
                    "SELECT 'user' || g || '@bench.test', 'x', 'user' "
                    "FROM generate_series(1, :n) g"
                ),
                {"n": USERS},
            )
            await conn.execute(
                text(
                    "INSERT INTO subscriptions (user_id, plan, expires_at) "
                    "SELECT id, (ARRAY['plus', 'pro', 'ultra'])[1 + (abs(hashtext(id::text)) % 3)], "
                    "now() + interval '30 days' FROM users WHERE abs(hashtext(email)) % 3 = 0"
                )
            )
            await conn.execute(text("REFRESH MATERIALIZED VIEW active_subscriptions"))
            await conn.execute(text("UPDATE view_refreshes SET refreshed_at = now()"))
            ids = (await conn.execute(text("SELECT id FROM users"))).scalars().all()
    finally:
        await engine.dispose()
    return list(ids)


async def _measure(
    database_url: str, redis_url: str, ids: list[uuid.UUID], n: int
) -> dict[str, Any]:
    from surge.identity import repository
    from surge.identity.runtime import install_identity
    from surge.kit.runtime import Runtime

    # The tiers below the free users' snapshot are what is measured: without it, every
    # user of a batch goes through memory → Redis → PostgreSQL (ADR 0050).
    settings = Settings(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        LOG_LEVEL="WARNING",
        IDENTITY_FREE_SNAPSHOT=False,
    )
    runtime = Runtime(settings)
    await runtime.start()
    identity = install_identity(runtime)
    await identity.start(warm=False, refresh_view=False)
    store = identity.privileges
    rng = random.Random(19)
    pool = list(ids)
    rng.shuffle(pool)
    cpu: dict[str, list[float]] = {"database": [], "redis": [], "memory": [], "sql_only": []}
    try:
        await store.get_many(pool[:BATCH])  # warm the code paths and the connection pool
        for i in range(1, n + 1):
            batch = pool[i * BATCH : (i + 1) * BATCH]
            started = time.process_time()
            await store.get_many(batch)  # cold: never seen by memory or Redis
            cpu["database"].append(time.process_time() - started)
            store.forget_all_local()
            started = time.process_time()
            await store.get_many(batch)
            cpu["redis"].append(time.process_time() - started)
            await store.get_many(batch)  # first memory answer: built once per entry
            started = time.process_time()
            await store.get_many(batch)
            cpu["memory"].append(time.process_time() - started)
            other = pool[-(i + 1) * BATCH : -i * BATCH]
            started = time.process_time()
            async with runtime.db.read_session() as session:
                await repository.grants(session, other)
            cpu["sql_only"].append(time.process_time() - started)
    finally:
        await identity.close()
        await runtime.stop()
    return {k: median(v) * 1000 for k, v in cpu.items()}


def main(quick: bool = False) -> None:
    n = 40 if quick else 200
    folder = Path(tempfile.mkdtemp(prefix="surge-bench-privilege-batch-"))
    pg = EmbeddedPostgres(folder / "pg")
    redis = EmbeddedRedis(folder / "redis")
    try:
        with console.status("Starting PostgreSQL and Redis; seeding users..."):
            pg.start()
            redis.start()
            migrate.upgrade(pg.url)
            ids = asyncio.run(_seed(pg.url))
        ms = asyncio.run(_measure(pg.url, redis.url, ids, n))
    finally:
        redis.stop()
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)
    ratio = ms["database"] / ms["sql_only"]
    report(
        "privilege_batch",
        ours={f"cpu_ms_{k}": round(v, 3) for k, v in ms.items() if k != "sql_only"},
        baseline={"cpu_ms_grants_query": round(ms["sql_only"], 3)},
        ratio=ratio,
        target="information: CPU per batch of 50 by tier (issue 19)",
        ok=True,
        rows=[
            (
                "batch of 50 from PostgreSQL, CPU ms",
                f"{ms['database']:.3f}",
                f"{ms['sql_only']:.3f} (grants query alone)",
            ),
            ("batch of 50 from Redis, CPU ms", f"{ms['redis']:.3f}", ""),
            ("batch of 50 from memory, CPU ms", f"{ms['memory']:.3f}", ""),
        ],
        extra={"batch": BATCH, "batches": n, "users": USERS},
    )


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
