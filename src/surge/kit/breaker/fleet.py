"""Fleet-wide opening through Redis: a quorum of open processes opens every process (see the
package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from surge.kit.breaker.core import (
    Breaker,
    BreakerRegistry,
    BreakerState,
    breakers,
    flush_all_metrics,
)
from surge.kit.pubsub import ChannelListener

if TYPE_CHECKING:
    from surge.config import Settings
    from surge.kit.redis import RedisGateway

log = structlog.get_logger()


class BreakerFleet:
    """Fleet-wide opening through Redis (see the module docstring). Owned by the runtime:
    ``await fleet.start()`` subscribes, ``await fleet.close()`` stops. While Redis is down
    nothing is published or read and every process keeps its own breakers."""

    CHANNEL = "surge:breaker:events"

    def __init__(
        self,
        registry: BreakerRegistry,
        gateway: RedisGateway,
        *,
        quorum: int = 1,
        prefix: str = "surge:breaker:",
    ) -> None:
        self.registry = registry
        self.gateway = gateway
        self.quorum = max(1, quorum)
        self.prefix = prefix
        #: Unique per process (pid alone repeats across containers).
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._listener = ChannelListener(
            gateway, self.CHANNEL, self._on_message,
            on_subscribed=self._on_subscribed, on_idle=self._flush_metrics, name="breaker-fleet",
        )  # fmt: skip
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False
        self._hooked: set[str] = set()

    async def start(self) -> None:
        self.registry.on_create(self._hook)
        self.gateway.on_change(self._on_redis_change)
        self._listener.start()
        await self.sync()

    async def ready(self) -> None:
        """Return once subscribed to the fleet's events (tests; a start-up probe)."""
        await self._listener.wait_listening()

    async def settled(self) -> None:
        """Return once every report this process started (open, reset) reached Redis."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _hook(self, breaker: Breaker) -> None:
        if breaker.name not in self._hooked:
            self._hooked.add(breaker.name)
            breaker.add_listener(self._on_transition)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            if self._closed:
                raise RuntimeError("closed")
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # closed, or no loop (sync caller): stay local
            coro.close()
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _on_transition(self, breaker: Breaker, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN and breaker.remaining_open() != float("inf"):
            self._spawn(self._report_open(breaker.name, breaker.remaining_open()))
        elif new is BreakerState.CLOSED and old is not BreakerState.HALF_OPEN:
            # A manual reset: close everywhere. (Closing after trials is each process's own.)
            self._spawn(self._report_reset(breaker.name))

    def _on_redis_change(self, up: bool) -> None:
        if up:
            self._spawn(self._resync())

    async def _resync(self) -> None:
        """Redis is back: announce what opened here meanwhile, then learn what opened there."""
        for name in sorted(self._hooked):
            breaker = self.registry.get(name)
            remaining = breaker.remaining_open()
            if breaker.state is BreakerState.OPEN and 0 < remaining != float("inf"):
                await self._report_open(name, remaining)
        await self.sync()

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}:open"

    async def _report_open(self, name: str, duration: float) -> None:
        """Record this process as open; publish a fleet opening once the quorum is reached."""
        now_ms = int(time.time() * 1000)
        until_ms = now_ms + int(duration * 1000)
        key = self._key(name)
        try:
            async with self.gateway.guard() as redis:
                pipe = redis.pipeline(transaction=True)
                pipe.zremrangebyscore(key, 0, now_ms)
                pipe.zadd(key, {self.origin: until_ms})
                pipe.zcard(key)
                pipe.pexpire(key, int(duration * 1000) + 1000)
                _, _, open_count, _ = await pipe.execute()
                if int(open_count) >= self.quorum:
                    message: dict[str, Any] = {
                        "name": name,
                        "state": "open",
                        "ms": int(duration * 1000),
                        "origin": self.origin,
                        "until_ms": until_ms,
                    }
                    await redis.set(
                        f"{self.prefix}{name}:fleet", json.dumps(message), px=message["ms"]
                    )
                    await redis.publish(self.CHANNEL, json.dumps(message))
        except Exception as exc:  # RedisUnavailable included: stay local
            log.info("breaker.fleet_unavailable", breaker=name, error=type(exc).__name__)

    async def _report_reset(self, name: str) -> None:
        try:
            async with self.gateway.guard() as redis:
                await redis.delete(self._key(name), f"{self.prefix}{name}:fleet")
                message = {"name": name, "state": "closed", "origin": self.origin}
                await redis.publish(self.CHANNEL, json.dumps(message))
        except Exception as exc:
            log.info("breaker.fleet_unavailable", breaker=name, error=type(exc).__name__)

    def _apply(self, message: dict[str, Any]) -> None:
        if message.get("origin") == self.origin:
            return
        name = str(message.get("name", ""))
        if name not in self.registry:
            return  # a breaker this process never used: nothing to protect here
        breaker = self.registry.get(name)
        if message.get("state") == "open":
            # Remaining time from the sender's wall clock, bounded by what it announced.
            remaining = min(
                float(message.get("ms", 0)) / 1000,
                (float(message.get("until_ms", 0)) - time.time() * 1000) / 1000,
            )
            if remaining > 0:
                breaker.open_for(remaining, reason=f"fleet:{message.get('origin')}")
        elif message.get("state") == "closed" and breaker.state is not BreakerState.CLOSED:
            breaker._forced = None
            breaker._transition(BreakerState.CLOSED, reason="fleet_reset", notify=False)

    async def sync(self) -> None:
        """Read the fleet state of every known breaker once (start-up, Redis came back)."""
        names = self.registry.names()
        if not names:
            return
        try:
            async with self.gateway.guard() as redis:
                values = await redis.mget([f"{self.prefix}{name}:fleet" for name in names])
        except Exception as exc:
            log.info("breaker.fleet_unavailable", error=type(exc).__name__)
            return
        for raw in values:
            if raw:
                self._apply(json.loads(raw))

    def _on_message(self, data: bytes) -> None:
        try:
            self._apply(json.loads(data))
        except (ValueError, TypeError, KeyError):
            log.warning("breaker.fleet_bad_message")

    async def _on_subscribed(self, resumed: bool) -> None:
        await self.sync()  # anything published while we were not subscribed

    def _flush_metrics(self) -> None:
        # At most a second between flushes of the batched call counts.
        flush_all_metrics(self.registry)

    async def close(self) -> None:
        self._closed = True
        await self._listener.close()
        for task in list(self._pending):
            task.cancel()
        for name in list(self._hooked):
            breaker = self.registry.get(name)
            with contextlib.suppress(ValueError):
                breaker._listeners.remove(self._on_transition)
        self._hooked.clear()
        with contextlib.suppress(ValueError):
            self.registry._created.remove(self._hook)


async def start_breakers(settings: Settings, gateway: RedisGateway) -> BreakerFleet | None:
    """Apply the BREAKER_ settings to the default profile and, with BREAKER_FLEET, start the
    fleet sync (the runtime keeps it in ``extensions["breakers"]`` and closes it at stop)."""
    breakers.configure(
        failure_rate=settings.BREAKER_FAILURE_RATE,
        slow_call_rate=settings.BREAKER_SLOW_CALL_RATE,
        slow_call_duration=settings.BREAKER_SLOW_CALL_DURATION.total_seconds(),
        window_size=settings.BREAKER_WINDOW_SIZE,
        minimum_calls=settings.BREAKER_MINIMUM_CALLS,
        open_duration=settings.BREAKER_OPEN_DURATION.total_seconds(),
        half_open_calls=settings.BREAKER_HALF_OPEN_CALLS,
    )
    if not settings.BREAKER_FLEET:
        return None
    fleet = BreakerFleet(breakers, gateway, quorum=settings.BREAKER_FLEET_QUORUM)
    await fleet.start()
    return fleet
