"""An invalidation that meets a busy Redis pool must still reach Redis, and one that cannot
must be deferred and replayed, never lost.

A plan change answers 204 once its ``invalidate_on_commit`` callback returns. Under load the
writer's Redis pool can be exhausted for longer than its wait (``No connection available``):
the gateway rightly does not call that an outage (Redis is up), and the cache used to queue
the delete as "pending", to be replayed when Redis *comes back* — which it never does, as it
never went down. The 204 went out, Redis kept the old value for its whole TTL, and every
process read it back (``surge load seed003_writes``: a plan change read back stale).

Here process A (the writer) has every connection of its pool held by others while it writes;
process B reads. Each test gives the connections back at a point where the old code had
already given up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from surge.kit.cache import Cache
from surge.kit.cache import metrics as cache_metrics
from surge.kit.db import Database, PoolConfig
from surge.kit.redis import RedisGateway
from tests.fixtures.waiting import eventually


@dataclass
class Writers:
    """Two caches on one namespace, each with its own gateway (two processes' worth)."""

    a: Cache
    b: Cache
    pool: Any  # A's connection pool
    value: dict[str, str] = field(default_factory=lambda: {"plan": "free"})
    held: list[Any] = field(default_factory=list)
    failures: int = 0
    failed: dict[int, asyncio.Event] = field(default_factory=dict)

    async def load(self) -> dict[str, str]:
        return dict(self.value)

    async def hold_pool(self) -> None:
        """The rest of A's process holds every connection of A's pool."""
        while self.pool.can_get_connection():
            self.held.append(await self.pool.get_connection())

    async def release_pool(self) -> None:
        for connection in self.held:
            await self.pool.release(connection)
        self.held.clear()

    def failure(self, n: int) -> asyncio.Event:
        """Set once A has noted its ``n``-th Redis failure (an L2 error: a busy pool)."""
        return self.failed.setdefault(n, asyncio.Event())


@pytest.fixture
async def writers(
    server_urls: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Writers]:
    url = server_urls[1]
    namespace = f"test-busy:{uuid.uuid4().hex[:8]}"
    gateway_a, gateway_b = RedisGateway(url), RedisGateway(url)
    a = Cache(gateway_a, namespace=namespace, ttl_jitter=0.0, resync_interval=0.1)
    b = Cache(gateway_b, namespace=namespace, ttl_jitter=0.0)
    await a.start()
    await b.start()
    await a.wait_listening()
    await b.wait_listening()
    pool: Any = gateway_a.raw.connection_pool
    pool.timeout = 0.2  # how long a command waits for a connection before giving up
    found = Writers(a, b, pool)
    note_degraded = a._note_degraded

    def noted() -> None:
        found.failures += 1
        found.failure(found.failures).set()
        note_degraded()

    monkeypatch.setattr(a, "_note_degraded", noted)
    try:
        yield found
    finally:
        await found.release_pool()
        await a.close()
        await b.close()
        await gateway_a.close()
        await gateway_b.close()


async def test_a_delete_on_a_busy_pool_reaches_redis_before_it_returns(
    writers: Writers,
) -> None:
    a, b = writers.a, writers.b
    assert (await b.fetch("user-1", writers.load)).value == {"plan": "free"}  # in Redis now
    await writers.hold_pool()
    writers.value["plan"] = "pro"  # the plan change commits...
    delete = asyncio.create_task(a.delete("user-1"))  # ...and invalidates
    noted_failure = asyncio.create_task(writers.failure(1).wait())
    # Until A's first attempt has met the exhausted pool (or, on the old code, given up).
    await asyncio.wait([delete, noted_failure], return_when=asyncio.FIRST_COMPLETED)
    assert writers.failure(1).is_set()
    await writers.release_pool()
    await delete  # the 204 goes out now
    b.l1.clear()  # B's memory is another matter (pub/sub); this is about Redis
    result = await b.fetch("user-1", writers.load)
    assert result.value == {"plan": "pro"}, "Redis still held the plan from before"


async def test_a_set_on_a_busy_pool_reaches_every_process(writers: Writers) -> None:
    """``set`` writes L2, then tells the others to drop their copy. On a busy pool the
    write fails, and the announcement gave up at once: B kept the old value in memory (and
    Redis kept it too, for B to read back). Now the announcement waits out the busy pool
    like any invalidation, and a write that failed drops the old value from Redis."""
    a, b = writers.a, writers.b
    assert (await b.fetch("user-1", writers.load)).value == {"plan": "free"}  # B's memory
    await writers.hold_pool()
    writers.value["plan"] = "pro"
    written = asyncio.create_task(a.set("user-1", {"plan": "pro"}))
    second_failure = asyncio.create_task(writers.failure(2).wait())
    # The write failed (1), then the announcement's first attempt (2): the old code was
    # done by then.
    await asyncio.wait([written, second_failure], return_when=asyncio.FIRST_COMPLETED)
    assert writers.failure(2).is_set()
    await writers.release_pool()
    await written

    async def b_reads_the_new_plan() -> bool:
        return (await b.fetch("user-1", writers.load)).value == {"plan": "pro"}

    await eventually(b_reads_the_new_plan, timeout=5, message="B still reads the old plan")


async def test_an_invalidation_after_commit_that_gives_up_is_replayed_while_redis_is_up(
    writers: Writers, server_urls: tuple[str, str]
) -> None:
    """The pool stays busy past every retry of an invalidation made after a commit: the
    write is committed and its reply goes out, so the invalidation is deferred (logged,
    counted) and replayed by the resync loop once a connection is free — not held for an
    outage's end that never comes (Redis is up), which left the old value in Redis for
    its TTL and in B's memory."""
    a, b = writers.a, writers.b
    counter = cache_metrics.INVALIDATIONS_DEFERRED.labels(a.name)
    assert (await b.fetch("user-1", writers.load)).value == {"plan": "free"}
    db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=2))
    try:
        before = counter._value.get()
        await writers.hold_pool()
        with capture_logs() as logs:
            async with db.session() as session:
                writers.value["plan"] = "pro"  # the write this unit of work commits
                a.invalidate_on_commit(session, keys=["user-1"])
            # The unit of work is over: every attempt has met the busy pool.
            assert writers.failures >= 5
            await writers.release_pool()

            async def b_reads_the_new_plan() -> bool:
                return (await b.fetch("user-1", writers.load)).value == {"plan": "pro"}

            await eventually(b_reads_the_new_plan, timeout=5, message="the old plan stayed")
        assert counter._value.get() >= before + 1
        deferred = [entry for entry in logs if entry["event"] == "cache.invalidation_deferred"]
        assert deferred, logs
    finally:
        await db.close()
