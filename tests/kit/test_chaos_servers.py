"""Seed 000 checklist, with servers these tests start (and stop) themselves:
stop PostgreSQL → /api/health 503 within 2 s, back → 200; stop Redis → `degraded` fast while
other endpoints keep answering, back → picked up within 5 s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from surge.app import create_app
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis
from surge.kit.redis import RedisGateway, RedisUnavailable
from surge.kit.web.deps import SessionDep
from tests.fixtures.clients import app_client
from tests.fixtures.servers import start_postgres, start_redis
from tests.fixtures.settings import make_settings

pytestmark = pytest.mark.chaos


async def _until(client: httpx.AsyncClient, status: int, within: float) -> float:
    started = time.monotonic()
    while True:
        response = await client.get("/api/health")
        if response.status_code == status:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"/api/health stayed {response.status_code}: {response.text}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def own_pg(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    server = await asyncio.to_thread(start_postgres, tmp_path / "pg")
    yield server
    await asyncio.to_thread(server.stop, "immediate")


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    server = await asyncio.to_thread(start_redis, tmp_path / "redis")
    yield server
    await asyncio.to_thread(server.stop)


async def test_postgres_stop_gives_503_then_recovers(
    own_pg: EmbeddedPostgres, server_urls: tuple[str, str]
) -> None:
    settings = make_settings(own_pg.url, server_urls[1], DB_CONNECT_TIMEOUT=1)
    app = create_app(settings)

    @app.post("/t/write")
    async def write(session: SessionDep) -> dict[str, bool]:
        await session.execute(text("CREATE TABLE IF NOT EXISTS chaos_t (v int)"))
        await session.execute(text("INSERT INTO chaos_t VALUES (1)"))
        return {"ok": True}

    async for client in app_client(app):
        assert (await client.get("/api/health")).status_code == 200
        assert (await client.post("/t/write")).status_code == 200

        await asyncio.to_thread(own_pg.stop, "immediate")
        elapsed = await _until(client, 503, within=2.0)
        assert elapsed < 2.0
        body = (await client.get("/api/health")).json()
        assert body["status"] == "degraded"
        assert body["checks"] == {"database": False, "redis": True}

        refused = await client.post("/t/write")
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"]
        assert (await client.get("/livez")).status_code == 200

        await asyncio.to_thread(own_pg.start)
        await _until(client, 200, within=10.0)
        assert (await client.post("/t/write")).status_code == 200


async def test_postgres_sigkill_gives_503(
    own_pg: EmbeddedPostgres, server_urls: tuple[str, str]
) -> None:
    app = create_app(make_settings(own_pg.url, server_urls[1], DB_CONNECT_TIMEOUT=1))
    async for client in app_client(app):
        assert (await client.get("/api/health")).status_code == 200
        await asyncio.to_thread(own_pg.kill)
        assert await _until(client, 503, within=2.0) < 2.0
        await asyncio.to_thread(own_pg.start)
        await _until(client, 200, within=15.0)


async def test_redis_stop_degrades_fast_and_recovers(
    own_redis: EmbeddedRedis, server_urls: tuple[str, str]
) -> None:
    app = create_app(make_settings(server_urls[0], own_redis.url))
    async for client in app_client(app):
        assert (await client.get("/api/health")).status_code == 200
        await asyncio.to_thread(own_redis.stop)

        started = time.monotonic()
        response = await client.get("/api/health")
        first = time.monotonic() - started
        assert response.status_code == 503
        assert response.json()["checks"] == {"database": True, "redis": False}
        assert first < 1.5, f"first health call after Redis stop took {first:.2f}s"

        # While Redis is known down, callers learn it without waiting on a socket.
        timings = []
        for _ in range(20):
            started = time.monotonic()
            assert (await client.get("/api/health")).status_code == 503
            assert (await client.get("/livez")).status_code == 200
            timings.append(time.monotonic() - started)
        assert max(timings) < 0.25, f"slow while Redis is down: {max(timings):.3f}s"

        await asyncio.to_thread(own_redis.start)  # same port (kept in its data folder)
        assert await _until(client, 200, within=5.0) <= 5.0


async def test_gateway_signals_down_without_io(own_redis: EmbeddedRedis) -> None:
    gateway = RedisGateway(own_redis.url, backoff_step=0.05, backoff_max=0.2)
    try:
        assert await gateway.ping()
        await asyncio.to_thread(own_redis.kill)
        with pytest.raises(RedisUnavailable):
            async with gateway.guard() as client:
                await client.get("k")
        assert not gateway.is_up
        started = time.perf_counter()
        for _ in range(1000):
            with pytest.raises(RedisUnavailable):
                gateway.client()
        per_call = (time.perf_counter() - started) / 1000
        assert per_call < 0.001, "the down signal must not touch the network"
        changes: list[bool] = []
        gateway.on_change(changes.append)
        await asyncio.to_thread(own_redis.start)
        for _ in range(100):
            if gateway.is_up:
                break
            await asyncio.sleep(0.05)
        assert gateway.is_up
        assert changes == [True]
        assert await gateway.call(lambda r: r.set("k", "v"))
    finally:
        await gateway.close()
