"""A cache fill reads the primary, never a replica that may not have replayed the write whose
invalidation the fill follows (ADR 0060). The replica is ``lagging_replica_url``: a database
that has replayed none of the suite's writes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from sqlalchemy import text

from surge.kit.cache import Cache
from surge.kit.db import Database, PoolConfig, primary_reads
from surge.kit.redis import RedisGateway


@pytest.fixture
async def replicated(
    server_urls: tuple[str, str], lagging_replica_url: str
) -> AsyncIterator[Database]:
    database = Database(server_urls[0], [lagging_replica_url], PoolConfig(min_size=0, max_size=2))
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def cache(server_urls: tuple[str, str]) -> AsyncIterator[Cache]:
    gateway = RedisGateway(server_urls[1])
    made = Cache(gateway, namespace=f"test:{uuid.uuid4().hex[:8]}", ttl_jitter=0.0)
    await made.start()
    try:
        yield made
    finally:
        await made.close()
        await gateway.close()


async def _server(db: Database) -> str:
    """Which database answered a read session: the primary's name or the replica's."""
    async with db.read_session() as session:
        return str((await session.execute(text("SELECT current_database()"))).scalar())


async def test_primary_reads_route_read_sessions_to_the_primary(replicated: Database) -> None:
    assert await _server(replicated) == "surge_lagging_replica"  # a stale read may lag
    with primary_reads():
        assert await _server(replicated) != "surge_lagging_replica"
    assert await _server(replicated) == "surge_lagging_replica"  # only inside the block


async def test_a_fill_after_an_invalidation_reads_the_primary(
    replicated: Database, cache: Cache
) -> None:
    async def load() -> str:
        return await _server(replicated)

    await cache.set("k", "old")
    await cache.delete("k")  # a write committed on the primary, then forgotten
    assert (await cache.fetch("k", load)).value != "surge_lagging_replica"

    async def load_many(keys: Sequence[str]) -> dict[str, str]:
        return {key: await _server(replicated) for key in keys}

    assert await cache.warm(["a", "b"], load_many) == 2  # bulk fills too
    batch = await cache.fetch_many(["c", "d"], load_many)
    assert {key: result.source for key, result in batch.items()} == {"c": "loader", "d": "loader"}
    for key in ("a", "b", "c", "d"):
        assert await cache.get(key) not in (None, "surge_lagging_replica")
