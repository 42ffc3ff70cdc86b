"""Slow queries are logged and counted; READONLY makes the Redis gateway reconnect; the
external-URL path works against servers Surge did not start."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
import redis.asyncio as redis_async
from sqlalchemy import text
from structlog.testing import capture_logs

from surge.kit.db import Database, PoolConfig
from surge.kit.embedded import free_port
from surge.kit.redis import RedisGateway, RedisUnavailable
from surge.kit.runtime import Runtime
from surge.kit.telemetry import metrics
from tests.fixtures.servers import start_redis
from tests.fixtures.settings import make_settings


async def test_slow_queries_are_logged_and_counted(server_urls: tuple[str, str]) -> None:
    db = Database(server_urls[0], config=PoolConfig(min_size=0, slow_query=0.05))
    counter = metrics.DB_SLOW_QUERIES.labels("primary")
    before = counter._value.get()
    try:
        with capture_logs() as logs:
            async with db.session() as session:
                await session.execute(text("SELECT 1"))
                await session.execute(text("SELECT pg_sleep(0.08)"))
        slow = [entry for entry in logs if entry["event"] == "db.slow_query"]
        assert len(slow) == 1, logs
        assert "pg_sleep" in slow[0]["statement"]
        assert slow[0]["duration_ms"] >= 80
        assert counter._value.get() == before + 1
    finally:
        await db.close()


async def test_readonly_reply_reconnects_without_marking_down(tmp_path: Path) -> None:
    """Seed 000 `reconnectOnError: READONLY`: a demoted primary makes the gateway drop its
    connections; once writable again, the next call works — Redis was never 'down'."""
    server = await asyncio.to_thread(start_redis, tmp_path / "redis")
    admin = redis_async.Redis.from_url(server.url)
    gateway = RedisGateway(server.url)
    try:
        assert await gateway.call(lambda r: r.set("k", "1"))
        await admin.replicaof("127.0.0.1", free_port())
        with pytest.raises(RedisUnavailable, match="READONLY"):
            await gateway.call(lambda r: r.set("k", "2"))
        assert gateway.is_up
        await asyncio.sleep(0.05)  # the pool disconnect runs as a task
        await admin.replicaof("NO", "ONE")
        assert await gateway.call(lambda r: r.set("k", "3"))
    finally:
        await gateway.close()
        await admin.aclose()
        await asyncio.to_thread(server.stop)


def _reachable(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


EXTERNAL_DB = os.environ.get(
    "SURGE_TEST_EXTERNAL_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
EXTERNAL_REDIS = os.environ.get("SURGE_TEST_EXTERNAL_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.mark.skipif(
    not (_reachable(5432) and _reachable(6379)),
    reason="no PostgreSQL on 5432 and Redis on 6379 on this machine (external-URL path)",
)
async def test_external_servers_are_used_as_given() -> None:
    """With URLs set, Surge uses those servers unchanged (read-only checks: shared services)."""
    settings = make_settings(EXTERNAL_DB, EXTERNAL_REDIS, DB_POOL_MIN=1)
    runtime = Runtime(settings)
    await runtime.start()
    try:
        status, body = await runtime.health.report()
        assert status == 200, body
        async with runtime.db.read_session() as session:
            port = await session.scalar(text("SELECT inet_server_port()"))
        assert port == 5432
        assert runtime.redis.raw.connection_pool.connection_kwargs["port"] == 6379
    finally:
        await runtime.stop()


async def test_exhausted_pool_is_not_an_outage(server_urls: tuple[str, str]) -> None:
    """More commands in flight than pooled connections wait for one; Redis stays 'up'."""
    gateway = RedisGateway(server_urls[1], max_connections=4)
    try:

        async def slow_call() -> object:
            # BLPOP on a key nobody pushes to holds its connection 20 ms (DEBUG SLEEP would
            # too, but Redis 7 refuses DEBUG unless enable-debug-command is set).
            return await gateway.call(
                lambda r: r.execute_command("BLPOP", "surge-test:never-pushed", "0.02")  # type: ignore[no-untyped-call]
            )

        await asyncio.gather(*(slow_call() for _ in range(40)))
        assert gateway.is_up
    finally:
        await gateway.close()


def test_batched_counter_reaches_prometheus_at_the_flush() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    counter = Counter("t_batched_total", "Batched test counter.", ["source"], registry=registry)
    batched = metrics.BatchedCounter(counter)
    hits = batched.labels("memory")
    assert batched.labels("memory") is hits  # one child per label set
    for _ in range(5):
        hits.inc()
    batched.labels("redis").inc(3)
    assert registry.get_sample_value("t_batched_total", {"source": "memory"}) == 0.0
    metrics.flush_all()  # registered on creation: /metrics, alerts and admin flush first
    assert registry.get_sample_value("t_batched_total", {"source": "memory"}) == 5.0
    assert registry.get_sample_value("t_batched_total", {"source": "redis"}) == 3.0
    metrics.flush_all()  # nothing counted twice
    assert registry.get_sample_value("t_batched_total", {"source": "memory"}) == 5.0
