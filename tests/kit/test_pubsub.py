"""kit.pubsub.ChannelListener (with kit.backoff and kit.aio): confirmed subscribe, a restart
signalled as a gap, clean shutdown — against real Redis servers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from pathlib import Path

import pytest
import redis.asyncio as redis_async

from surge.kit.aio import cancel_until_done
from surge.kit.backoff import Backoff, delay
from surge.kit.pubsub import ChannelListener
from surge.kit.redis import RedisGateway
from tests.fixtures.servers import start_redis
from tests.fixtures.waiting import eventually


class Recorder:
    """What a listener's callbacks saw, with events to wait on instead of sleeping."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.subscribed: asyncio.Queue[bool] = asyncio.Queue()
        self.lost = asyncio.Event()

    def on_message(self, data: bytes) -> None:
        self.messages.put_nowait(data)

    async def on_subscribed(self, resumed: bool) -> None:
        self.subscribed.put_nowait(resumed)

    def on_lost(self, error: BaseException) -> None:
        self.lost.set()


def listener_for(gateway: RedisGateway, channel: str, seen: Recorder) -> ChannelListener:
    return ChannelListener(
        gateway, channel, seen.on_message,
        on_subscribed=seen.on_subscribed, on_lost=seen.on_lost, poll=0.2,
        backoff=Backoff(0.05, 0.2), name="test",
    )  # fmt: skip


async def numsub(client: redis_async.Redis, channel: str) -> int:
    [(_, count)] = await client.pubsub_numsub(channel)
    return int(count)


async def test_messages_published_after_the_confirmation_arrive(
    server_urls: tuple[str, str], redis_client: redis_async.Redis
) -> None:
    gateway = RedisGateway(server_urls[1])
    channel = f"test:pubsub:{uuid.uuid4().hex}"
    seen = Recorder()
    listener = listener_for(gateway, channel, seen)
    listener.start()
    try:
        assert await asyncio.wait_for(seen.subscribed.get(), 10) is False  # not a resumption
        # Confirmed before on_subscribed ran: Redis already counts us.
        assert await numsub(redis_client, channel) == 1
        await redis_client.publish(channel, b"one")
        assert await asyncio.wait_for(seen.messages.get(), 10) == b"one"
        assert listener.listening
    finally:
        await listener.close()
        await gateway.close()
    assert not listener.listening

    async def unsubscribed() -> bool:  # the server sees the socket close a moment later
        return await numsub(redis_client, channel) == 0

    await eventually(unsubscribed, timeout=5, message="close() must disconnect")


@pytest.mark.chaos
async def test_a_restarted_redis_is_signalled_as_a_gap_and_listening_resumes(
    tmp_path: Path,
) -> None:
    server = start_redis(tmp_path / "redis")
    gateway = RedisGateway(server.url)
    publisher = redis_async.Redis.from_url(server.url)
    channel = f"test:pubsub:{uuid.uuid4().hex}"
    seen = Recorder()
    listener = listener_for(gateway, channel, seen)
    listener.start()
    try:
        assert await asyncio.wait_for(seen.subscribed.get(), 10) is False
        server.stop()
        await asyncio.wait_for(seen.lost.wait(), 10)
        assert not listener.listening
        server.start()  # same port
        # The caller learns that messages may have been lost while it was away.
        assert await asyncio.wait_for(seen.subscribed.get(), 20) is True
        await publisher.publish(channel, b"after")
        assert await asyncio.wait_for(seen.messages.get(), 10) == b"after"
    finally:
        await listener.close()
        await publisher.aclose()
        await gateway.close()
        server.stop()


async def test_a_handler_error_does_not_stop_the_listener(
    server_urls: tuple[str, str], redis_client: redis_async.Redis
) -> None:
    gateway = RedisGateway(server_urls[1])
    channel = f"test:pubsub:{uuid.uuid4().hex}"
    seen = Recorder()

    def picky(data: bytes) -> None:
        if data == b"bad":
            raise ValueError("cannot read it")
        seen.on_message(data)

    listener = ChannelListener(gateway, channel, picky, on_subscribed=seen.on_subscribed, poll=0.2)
    listener.start()
    try:
        await asyncio.wait_for(seen.subscribed.get(), 10)
        await redis_client.publish(channel, b"bad")
        await redis_client.publish(channel, b"good")
        assert await asyncio.wait_for(seen.messages.get(), 10) == b"good"
        assert listener.rounds == 1, "a bad message is not a lost connection"
    finally:
        await listener.close()
        await gateway.close()


class TestBackoff:
    def test_exponential_and_capped(self) -> None:
        waits = Backoff(0.1, 1.0)
        assert [round(waits.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
        waits.reset()
        assert waits.next() == pytest.approx(0.1)

    def test_equal_jitter_stays_between_half_and_all_of_nominal(self) -> None:
        rng = random.Random(7)
        for attempt in range(1, 12):
            nominal = min(60.0, 2.0 * 2 ** (attempt - 1))
            wait = delay(attempt, 2.0, 60.0, rng=rng)
            assert nominal / 2 <= wait <= nominal

    def test_full_jitter_can_be_short(self) -> None:
        rng = random.Random(1)
        waits = [delay(5, 1.0, 10.0, jitter="full", rng=rng) for _ in range(200)]
        assert min(waits) < 2.0 <= max(waits) <= 10.0


async def test_cancel_until_done_outlasts_a_swallowed_cancellation() -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # as redis-py's reads sometimes do
        await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    await cancel_until_done(task, grace=0.05, retry_every=0.01)
    assert swallowed.is_set()
    assert task.done()
    with contextlib.suppress(asyncio.CancelledError):
        await task
