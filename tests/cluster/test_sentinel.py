"""The gateway follows Redis Sentinel across a failover (issue 18), on real servers: two
redis-servers (primary + replica) and one Sentinel, all on loopback, started here.

``SENTINEL FAILOVER`` demotes the old primary *and leaves it running*: the case where a plain
client keeps its connections to it and gets ``READONLY`` on every write. Runs in ``make test``
(a few seconds, no root)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis_async

from surge.kit.embedded import EmbeddedRedis, _redis_binary, free_port, wait_for_port
from surge.kit.redis import RedisGateway, RedisUnavailable, parse_sentinels
from tests.fixtures.waiting import eventually

MASTER = "surge-test"


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis, int]]:
    primary = EmbeddedRedis(tmp_path / "a")
    primary.start()
    replica = EmbeddedRedis(tmp_path / "b")
    replica.start()
    subprocess.run(
        [str(_redis_binary()).replace("redis-server", "redis-cli"), "-p", str(replica.port),
         "REPLICAOF", "127.0.0.1", str(primary.port)],
        check=False, capture_output=True,
    )  # fmt: skip
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 1\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 5000\n"
    )
    sentinel = subprocess.Popen(
        [str(_redis_binary()), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, timeout=10)
        yield primary, replica, port
    finally:
        sentinel.kill()
        sentinel.wait()
        replica.stop()
        primary.stop()


@pytest.fixture
async def linked(
    sentinel_setup: tuple[EmbeddedRedis, EmbeddedRedis, int],
) -> AsyncIterator[tuple[EmbeddedRedis, EmbeddedRedis, int]]:
    primary, replica, port = sentinel_setup
    client = redis_async.Redis(port=replica.port)
    if (await client.info("replication")).get("master_link_status") != "up":
        await client.replicaof("127.0.0.1", primary.port)

    async def link_up() -> bool:
        return (await client.info("replication")).get("master_link_status") == "up"

    await eventually(link_up, timeout=15, message="replica never linked")
    sentinel = redis_async.Redis(port=port)

    async def sees_replica() -> bool:
        replicas = await sentinel.sentinel_slaves(MASTER)
        return any(r.get("master-link-status") == "ok" for r in replicas)

    await eventually(sees_replica, timeout=20, message="Sentinel never saw the replica")
    yield sentinel_setup
    await client.aclose()
    await sentinel.aclose()


def test_parse_sentinels() -> None:
    assert parse_sentinels(["10.0.0.1:26380", "host"]) == [("10.0.0.1", 26380), ("host", 26379)]


async def test_gateway_follows_a_failover_to_the_promoted_replica(
    linked: tuple[EmbeddedRedis, EmbeddedRedis, int],
) -> None:
    primary, replica, port = linked
    gateway = RedisGateway(
        "redis://ignored:1/0", sentinels=[f"127.0.0.1:{port}"], sentinel_master=MASTER
    )
    try:
        async with gateway.guard() as r:
            await r.set("k", "before")
        assert await gateway.lane().execute("GET", "k") == b"before"
        connected_to = gateway.raw.connection_pool.master_address  # type: ignore[attr-defined]
        assert connected_to == ("127.0.0.1", primary.port)

        sentinel = redis_async.Redis(port=port)
        await sentinel.execute_command("SENTINEL", "FAILOVER", MASTER)  # type: ignore[no-untyped-call]

        async def switched() -> bool:
            address = await sentinel.sentinel_get_master_addr_by_name(MASTER)
            return isinstance(address, tuple) and int(address[1]) == replica.port

        await eventually(switched, timeout=30, message="Sentinel never switched the primary")
        await sentinel.aclose()
        demoted = redis_async.Redis(port=primary.port)
        await eventually(
            lambda: _role_is(demoted, "slave"), timeout=15, message="old primary not demoted"
        )
        await demoted.aclose()
        # The gateway is still connected to the old primary, up and now a replica: its next
        # write gets READONLY, and the reconnect must ask Sentinel, not the old address.
        # (Writes accepted by the old primary between the switch and its demotion are lost:
        # Redis replication is asynchronous; docs/scaling.md.)

        async def written_on_new_primary() -> bool:
            try:
                async with gateway.guard() as r:
                    await r.set("k", "after")
                await gateway.lane().execute("SET", "lane", "after")
            except (RedisUnavailable, ConnectionError):
                return False
            except Exception as error:  # READONLY through the lane: reset, like the callers
                gateway.mark_down(error)
                return False
            return True

        await eventually(written_on_new_primary, timeout=30, message="never wrote again")
        promoted = redis_async.Redis(port=replica.port)
        assert (await promoted.info("replication"))["role"] == "master"
        assert await promoted.get("k") == b"after"
        assert await promoted.get("lane") == b"after"
        await promoted.aclose()
        moved_to = gateway.raw.connection_pool.master_address  # type: ignore[attr-defined]
        assert moved_to == ("127.0.0.1", replica.port)
    finally:
        await gateway.close()


async def _role_is(client: redis_async.Redis, role: str) -> bool:
    return bool((await client.info("replication"))["role"] == role)
