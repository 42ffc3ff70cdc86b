"""An invalidation that meets a busy Redis pool must still reach Redis before it returns.

A plan change answers 204 once its ``invalidate_on_commit`` callback returns. Under load the
writer's Redis pool can be exhausted for longer than its wait (``No connection available``):
the gateway rightly does not call that an outage (Redis is up), and the cache used to queue
the delete as "pending", to be replayed when Redis *comes back* — which it never does, as it
never went down. The 204 went out, Redis kept the old value for its whole TTL, and every
process read it back (``surge load seed003_writes``: a plan change read back stale).

Here process A (the writer) has every connection of its pool held by others when it
deletes; process B reads right after the delete returns. The held connections are given back
only once A's first attempt has failed (A noted the L2 error): on the old code the
delete had already returned by then, leaving Redis stale."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from surge.kit.cache import Cache
from surge.kit.redis import RedisGateway


async def test_a_delete_on_a_busy_pool_reaches_redis_before_it_returns(
    server_urls: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server_urls[1]
    namespace = f"test-busy:{uuid.uuid4().hex[:8]}"
    gateway_a, gateway_b = RedisGateway(url), RedisGateway(url)
    a = Cache(gateway_a, namespace=namespace, ttl_jitter=0.0)
    b = Cache(gateway_b, namespace=namespace, ttl_jitter=0.0)
    await a.start()
    await b.start()
    await a.wait_listening()
    await b.wait_listening()
    value = {"plan": "free"}

    async def load() -> dict[str, str]:
        return dict(value)

    failed = asyncio.Event()
    note_degraded = a._note_degraded

    def noted() -> None:
        failed.set()
        note_degraded()

    monkeypatch.setattr(a, "_note_degraded", noted)
    pool: Any = gateway_a.raw.connection_pool
    pool.timeout = 0.2  # how long a command waits for a connection before giving up
    held: list[Any] = []
    try:
        assert (await b.fetch("user-1", load)).value == {"plan": "free"}  # in Redis now
        while pool.can_get_connection():  # the rest of A's process holds every connection
            held.append(await pool.get_connection())
        value["plan"] = "pro"  # the plan change commits...
        delete = asyncio.create_task(a.delete("user-1"))  # ...and invalidates
        noted_failure = asyncio.create_task(failed.wait())
        # Until A's first attempt has met the exhausted pool (or, on the old code, given up).
        await asyncio.wait([delete, noted_failure], return_when=asyncio.FIRST_COMPLETED)
        assert failed.is_set()
        for connection in held:
            await pool.release(connection)
        held.clear()
        await delete  # the 204 goes out now
        b.l1.clear()  # B's memory is another matter (pub/sub); this is about Redis
        result = await b.fetch("user-1", load)
        assert result.value == {"plan": "pro"}, "Redis still held the plan from before"
    finally:
        for connection in held:
            await pool.release(connection)
        await a.close()
        await b.close()
        await gateway_a.close()
        await gateway_b.close()
