"""A process whose event loop lags must not answer from memory what another process has just
invalidated (issue 19, ADR 0016 "Not met" 2 → ADR 0028).

Process B runs on its own thread and event loop (uvloop, as ``surge serve``); the test
blocks that loop (the lag of an overloaded web process) while process A deletes the key,
then lets B serve a read *before* its pub/sub listener task gets its turn. The invalidation
is already in B's socket, unread: B must see that and read through Redis. On the old code B
answered the old value from memory."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest
import uvloop

from surge.kit.cache import Cache
from surge.kit.redis import RedisGateway

T = TypeVar("T")


class Process:
    """A cache on its own thread and event loop (one "web process")."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """``fn()`` on the loop, as one callback (nothing else of the loop runs meanwhile)."""
        done: Future[T] = Future()

        def wrapped() -> None:
            try:
                done.set_result(fn())
            except BaseException as error:
                done.set_exception(error)

        self.loop.call_soon_threadsafe(wrapped)
        return done

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def process_b() -> Iterator[Process]:
    process = Process()
    yield process
    process.stop()


@pytest.fixture
def namespace() -> str:
    return f"test-lag:{uuid.uuid4().hex[:8]}"


async def test_a_lagging_loop_does_not_answer_an_invalidated_entry_from_memory(
    server_urls: tuple[str, str], process_b: Process, namespace: str
) -> None:
    url = server_urls[1]
    gateway_a = RedisGateway(url)
    a = Cache(gateway_a, namespace=namespace, ttl_jitter=0.0)
    await a.start()
    await a.wait_listening()

    async def start_b() -> tuple[Cache, RedisGateway]:
        gateway = RedisGateway(url)
        cache = Cache(gateway, namespace=namespace, ttl_jitter=0.0)
        await cache.start()
        await cache.wait_listening()
        return cache, gateway

    b, gateway_b = process_b.run(start_b())
    value = {"plan": "free"}

    async def load() -> dict[str, str]:
        return dict(value)

    try:
        assert process_b.run(b.fetch("user-1", load)).value == {"plan": "free"}
        assert process_b.call(lambda: b.peek("user-1")).result(10) == {"plan": "free"}

        # B's loop is busy (blocked on an event, the test's stand-in for seconds of lag).
        release, blocked = threading.Event(), threading.Event()
        answers: list[Any] = []

        def lagging_then_read() -> asyncio.Task[Any]:
            blocked.set()
            release.wait(10)
            answers.append(b.peek("user-1"))  # the rate-limit hook's synchronous read
            return process_b.loop.create_task(b.fetch("user-1", load))  # runs before the
            # listener task: its first step was scheduled before the loop polls again

        pending_fetch = process_b.call(lagging_then_read)
        assert blocked.wait(10)
        value["plan"] = "pro"  # the plan change commits...
        await a.delete("user-1")  # ...and invalidates: Redis DEL, then PUBLISH to B
        await gateway_a.raw.ping()  # Redis wrote B's message before answering this one
        release.set()
        fetch = pending_fetch.result(10)
        result = process_b.run(_await(fetch))
        assert answers == [None], "memory answered an entry invalidated before the read"
        assert result.value == {"plan": "pro"}
        assert result.source != "l1"
        assert b.stats()["l1_bypasses"] >= 1
    finally:

        async def stop_b() -> None:
            await b.close()
            await gateway_b.close()

        process_b.run(stop_b())
        await a.close()
        await gateway_a.close()


async def _await(task: asyncio.Task[T]) -> T:
    return await task
