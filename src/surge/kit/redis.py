"""One async Redis client per process, with seed 000's reconnect strategy and a fast "down" signal.

    RedisUnavailable (< DependencyUnavailable < ServiceUnavailable < SurgeError)

redis-py alone makes every caller wait for its own socket timeout while Redis is down, and
its built-in retries multiply that. Here the first failure marks Redis *down*; from then on
``RedisGateway.client()`` raises ``RedisUnavailable`` at once (no I/O) and one background
probe reconnects with backoff 100 ms × attempt, capped at 3 s (seed 000 ``retryStrategy``).
After 10 failed attempts in a row it logs ``redis.gave_up`` once and keeps probing at the
cap: a server that stops trying for good needs a human to restart it (ADR 0004).
A ``READONLY`` reply (we hit a demoted primary after a failover) drops every pooled
connection so the next command reconnects (seed 000 ``reconnectOnError``).

With ``sentinels`` (issue 18) the gateway follows Redis Sentinel: every new connection — the
pool's and the lane's — asks the Sentinels for the current primary, so the reconnect after a
failover (a lost connection, or the ``READONLY`` of a demoted primary that stays up, which a
plain redis-py client keeps hitting) lands on the promoted replica.

Callers use ``async with gateway.guard(): await gateway.client().get(...)`` or the
``call`` helper; both translate connection errors into ``RedisUnavailable`` and mark the
gateway down.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis.asyncio as redis_async
import structlog
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from surge.kit.errors import DependencyUnavailable
from surge.kit.resp import RespLane
from surge.kit.telemetry.metrics import REDIS_UP

log = structlog.get_logger()

T = TypeVar("T")

#: The errors that mean "Redis is not reachable", as opposed to a bad command.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def _pool_exhausted(error: BaseException) -> bool:
    return isinstance(error, MaxConnectionsError) or (
        isinstance(error, RedisConnectionError) and str(error) == "No connection available."
    )


def is_closed_transport(error: BaseException) -> bool:
    """uvloop's answer to a write on a connection the peer reset: a ``RuntimeError``
    ("unable to perform operation on <TCPTransport closed=True ...>; the handler is
    closed"), not a ``ConnectionError`` — still a lost connection (issue 20: resets injected
    by the fault proxy answered 500 through redis-py)."""
    return isinstance(error, RuntimeError) and "handler is closed" in str(error)


def parse_sentinels(entries: Sequence[str]) -> list[tuple[str, int]]:
    """``["10.0.0.1:26379", "host"]`` → ``[("10.0.0.1", 26379), ("host", 26379)]``."""
    found = []
    for entry in entries:
        host, _, port = entry.strip().rpartition(":") if ":" in entry else (entry, "", "26379")
        found.append((host.strip(), int(port)))
    return found


class SentinelBlockingPool(redis_async.BlockingConnectionPool):
    """A ``BlockingConnectionPool`` (callers wait for a free connection, see the gateway)
    whose connections are redis-py's ``SentinelManagedConnection``: each asks the Sentinels
    for the primary when it connects, and turns a ``READONLY`` into a disconnect. redis-py's
    own ``SentinelConnectionPool`` is not blocking, hence this small pool of ours."""

    is_master = True
    check_connection = False

    def __init__(self, sentinel: Sentinel, service_name: str, **kwargs: Any) -> None:
        kwargs["connection_class"] = SentinelManagedConnection
        super().__init__(**kwargs)
        self.connection_kwargs["connection_pool"] = weakref.proxy(self)
        self.sentinel = sentinel
        self.service_name = service_name
        self.master_address: tuple[str, int] | None = None

    async def get_master_address(self) -> tuple[str, int]:
        address: tuple[str, int] = await self.sentinel.discover_master(self.service_name)
        if self.master_address != address:
            if self.master_address is not None:
                log.warning("redis.primary_moved", previous=self.master_address, now=address)
            self.master_address = address
            await self.disconnect(inuse_connections=False)  # idle ones still point at the old
        return address


class RedisUnavailable(DependencyUnavailable):
    """Redis is down (or was a moment ago and has not answered a probe since)."""

    def __init__(self, message: str = "Redis is unavailable") -> None:
        super().__init__(message, retry_after=1)


class RedisGateway:
    """Owns the process's Redis client and knows, without I/O, whether Redis is up."""

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float = 1.0,
        connect_timeout: float = 0.5,
        backoff_step: float = 0.1,
        backoff_max: float = 3.0,
        max_attempts: int = 10,
        max_connections: int = 64,
        sentinels: Sequence[str] = (),
        sentinel_master: str = "surge",
    ) -> None:
        self.url = url
        self.backoff_step = backoff_step
        self.backoff_max = backoff_max
        self.max_attempts = max_attempts
        # A blocking pool: with more commands in flight than connections, callers wait
        # (up to socket_timeout) for one instead of failing; an exhausted pool is a busy
        # process, not a Redis outage, and must not flip the gateway to "down".
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            # Retries are ours (one probe for the whole process), not per command.
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            "max_connections": max_connections,
            "timeout": socket_timeout,
        }
        pool: redis_async.BlockingConnectionPool
        resolve: Callable[[], Awaitable[tuple[str, int]]] | None = None
        self.sentinel: Sentinel | None = None
        if sentinels:
            self.sentinel = Sentinel(  # type: ignore[no-untyped-call]
                parse_sentinels(sentinels),
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
            )
            from redis.asyncio.connection import parse_url

            params = {
                k: v for k, v in parse_url(url).items() if k in {"db", "username", "password"}
            }
            pool = SentinelBlockingPool(self.sentinel, sentinel_master, **params, **options)
            resolve = pool.get_master_address
        else:
            pool = redis_async.BlockingConnectionPool.from_url(url, **options)
        self._client: redis_async.Redis = redis_async.Redis(connection_pool=pool)
        self._lane = RespLane(
            url, socket_timeout=socket_timeout, connect_timeout=connect_timeout, resolve=resolve
        )
        self._up = True
        self._down_since = 0.0
        self._attempts = 0
        self._probe: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[bool], None]] = []
        REDIS_UP.set(1)

    # ---- state --------------------------------------------------------------------------
    @property
    def is_up(self) -> bool:
        return self._up

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(up)`` whenever Redis goes down or comes back (e.g. to resync a cache)."""
        self._listeners.append(listener)

    def client(self) -> redis_async.Redis:
        """The shared client, or ``RedisUnavailable`` immediately while Redis is down."""
        if not self._up:
            raise RedisUnavailable()
        return self._client

    def lane(self) -> RespLane:
        """The process's pipelined connection for hot commands (``surge.kit.resp``), or
        ``RedisUnavailable`` immediately while Redis is down. Its errors are redis-py's:
        classify them as for the client (``CONNECTION_ERRORS``, ``ReadOnlyError``)."""
        if not self._up:
            raise RedisUnavailable()
        return self._lane

    @property
    def raw(self) -> redis_async.Redis:
        """The client regardless of state (health probes, tests)."""
        return self._client

    def mark_down(self, error: BaseException) -> None:
        if isinstance(error, ReadOnlyError):
            # A failover demoted the server we talk to: reconnect, it is not "down".
            log.warning("redis.readonly_reconnect")
            self._lane.reset()
            asyncio.get_running_loop().create_task(self._client.connection_pool.disconnect())
            return
        if not self._up:
            return
        self._up = False
        self._lane.reset()
        self._down_since = time.monotonic()
        self._attempts = 0
        REDIS_UP.set(0)
        log.warning("redis.down", error=f"{type(error).__name__}: {error}")
        self._notify(False)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._reconnect())

    def _notify(self, up: bool) -> None:
        for listener in self._listeners:
            try:
                listener(up)
            except Exception:  # a listener must never break the gateway
                log.exception("redis.listener_failed")

    async def _reconnect(self) -> None:
        while not self._up:
            self._attempts += 1
            delay = min(self._attempts * self.backoff_step, self.backoff_max)
            if self._attempts == self.max_attempts + 1:
                log.error(
                    "redis.gave_up", attempts=self.max_attempts, next_every_s=self.backoff_max
                )
            await asyncio.sleep(delay)
            try:
                await self._client.connection_pool.disconnect()
                await asyncio.wait_for(self._client.ping(), timeout=max(delay, 0.5))
            except Exception:
                continue
            self._up = True
            REDIS_UP.set(1)
            log.info(
                "redis.up",
                attempts=self._attempts,
                down_for_s=round(time.monotonic() - self._down_since, 3),
            )
            self._notify(True)

    # ---- calls --------------------------------------------------------------------------
    @asynccontextmanager
    async def guard(self) -> AsyncIterator[redis_async.Redis]:
        """``async with gateway.guard() as r:`` — connection errors become RedisUnavailable."""
        client = self.client()
        try:
            yield client
        except ReadOnlyError as exc:
            self.mark_down(exc)
            raise RedisUnavailable("Redis answered READONLY; reconnecting") from exc
        except CONNECTION_ERRORS as exc:
            if _pool_exhausted(exc):
                raise RedisUnavailable("No Redis connection free in this process") from exc
            self.mark_down(exc)
            raise RedisUnavailable() from exc
        except RuntimeError as exc:
            if not is_closed_transport(exc):
                raise
            self.mark_down(exc)
            raise RedisUnavailable() from exc

    async def call(self, fn: Callable[[redis_async.Redis], Awaitable[T]]) -> T:
        async with self.guard() as client:
            return await fn(client)

    async def ping(self, timeout: float = 0.5) -> bool:
        """Health check: False at once while down, else a real PING within ``timeout``."""
        if not self._up:
            return False
        try:
            async with asyncio.timeout(timeout), self.guard() as client:
                await client.ping()
        except (RedisUnavailable, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self._lane.close()
        await self._client.aclose(close_connection_pool=True)  # the pool is ours: close it too
        if self.sentinel is not None:
            for sentinel in self.sentinel.sentinels:
                await sentinel.aclose()

    def info(self) -> dict[str, Any]:
        return {"up": self._up, "reconnect_attempts": self._attempts}
