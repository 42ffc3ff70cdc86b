"""The fault proxy against a real Redis: pass-through, latency, resets, blackhole, refusal,
and each healed (a fault that cannot be undone would leave the next chaos step broken)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_async
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from surge.sim.faultproxy import FaultProxy, ProxyThread
from tests.fixtures.servers import start_redis

NO_RETRY = Retry(NoBackoff(), 0)  # each fault seen as it is, not hidden by redis-py retries


@pytest.fixture
async def proxied(
    server_urls: tuple[str, str],
) -> AsyncIterator[tuple[FaultProxy, redis_async.Redis]]:
    host_port = server_urls[1].split("//", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    proxy = await FaultProxy(host, int(port)).start()
    client = redis_async.Redis(
        host="127.0.0.1", port=proxy.port, socket_timeout=0.5, socket_connect_timeout=0.5,
        retry=NO_RETRY,
    )  # fmt: skip
    try:
        yield proxy, client
    finally:
        await client.aclose()
        await proxy.close()


async def test_pass_through_and_latency(proxied: tuple[FaultProxy, redis_async.Redis]) -> None:
    proxy, client = proxied
    assert await client.ping()
    await proxy.latency(0.1)
    started = time.perf_counter()
    assert await client.ping()
    elapsed = time.perf_counter() - started
    assert 0.18 <= elapsed < 0.5, elapsed  # 0.1 s each way
    await proxy.heal()
    started = time.perf_counter()
    assert await client.ping()
    assert time.perf_counter() - started < 0.05


async def test_reset_and_refuse_new(proxied: tuple[FaultProxy, redis_async.Redis]) -> None:
    proxy, client = proxied
    assert await client.ping()
    await proxy.reset(refuse_new=True)
    with pytest.raises(RedisConnectionError):
        await client.ping()
    with pytest.raises(RedisConnectionError):
        await client.ping()
    await proxy.heal()
    assert await client.ping()


async def test_blackhole_holds_then_heals(proxied: tuple[FaultProxy, redis_async.Redis]) -> None:
    proxy, client = proxied
    assert await client.set("fp:k", "v")
    await proxy.blackhole()
    with pytest.raises((RedisTimeoutError, RedisConnectionError)):
        await client.get("fp:k")
    await proxy.heal()
    fresh = redis_async.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=1)
    try:
        assert await fresh.get("fp:k") == b"v"
    finally:
        await fresh.aclose()


async def test_stop_accepting_refuses_connections(
    proxied: tuple[FaultProxy, redis_async.Redis],
) -> None:
    proxy, _ = proxied
    port = proxy.port
    await proxy.stop_accepting()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await proxy.heal()
    assert proxy.port == port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PING\r\n")
    assert await reader.readline() == b"+PONG\r\n"
    writer.close()


def test_proxy_thread_drives_faults_from_sync_code(tmp_path: object) -> None:
    from pathlib import Path

    redis = start_redis(Path(str(tmp_path)) / "redis")
    thread = ProxyThread()
    try:
        proxy = thread.add("127.0.0.1", redis.port)

        async def ping() -> bool:
            client = redis_async.Redis(
                host="127.0.0.1", port=proxy.port, socket_timeout=0.5, retry=NO_RETRY
            )
            try:
                return bool(await client.ping())
            finally:
                await client.aclose()

        assert asyncio.run(ping())
        thread.call(proxy.reset(refuse_new=True))
        with pytest.raises(RedisConnectionError):
            asyncio.run(ping())
        thread.call(proxy.heal())
        assert asyncio.run(ping())
    finally:
        thread.close()
        redis.stop()
