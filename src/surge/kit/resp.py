"""``RespLane``: one multiplexed, pipelined Redis connection per process, for hot paths.

    redis.exceptions.RedisError
    ├── ConnectionError     the socket failed, closed or could not be opened: every command
    │                       in flight gets it; the next command reconnects
    ├── TimeoutError        no reply within ``socket_timeout``: the connection is dropped
    │                       (its replies can no longer be matched to their commands)
    ├── LaneReset           its owner dropped the connection on purpose (``reset()``: the
    │                       gateway saw an outage or ``READONLY``): not itself an outage
    └── ResponseError       an error reply, as redis-py names it (``NoScriptError``,
                            ``ReadOnlyError``, ``BusyLoadingError``, ...); the connection stays

Why not redis-py for these commands (ADR 0012): redis-py's asyncio client costs ~100 µs of
CPU per command on the 2-core bench machine — a pool checkout, ``asyncio.wait_for`` around
every write (a new Task per command on Python 3.11) and a timeout around every read — where a
bare ``asyncio.Protocol`` with hiredis costs about half, most of it the two syscalls. The
rate limiter pays one command per batch of decisions on every limited request, so that
difference is visible end to end (ADR 0012). Everything else in Surge keeps
using redis-py through ``RedisGateway``; the lane is for a few hot, simple commands.

How it works:

- **One connection, any number of callers.** A command is encoded and written at once;
  its future joins a FIFO; replies are parsed by hiredis and handed out in order (Redis
  answers a connection's commands in the order it received them). Concurrent callers are
  therefore pipelined on one socket without waiting for each other.
- **Cancellation is safe.** A caller that stops waiting leaves its slot in the FIFO; its
  reply is read and dropped, so later replies still reach their own callers.
- **One timer, not one per command.** A single timer watches the oldest command in flight;
  if it has had no reply after ``socket_timeout``, the connection is aborted and every
  command in flight fails with ``TimeoutError``.
- **Connecting** is lazy and shared: the first command starts one attempt (a task of its
  own, bounded by ``connect_timeout``; ``AUTH`` and ``SELECT`` from the URL) and every
  command waits for it; a caller cancelled meanwhile stops waiting without cancelling the
  attempt for the others.
- **One event loop.** The connection belongs to the loop that opened it; used from another
  loop (tests that run several), the lane opens a new one there and leaves the old one to
  its loop. URLs: ``redis://``, ``rediss://`` (TLS, ``ssl_cert_reqs`` /
  ``ssl_ca_certs`` / ``ssl_check_hostname`` query parameters) and ``unix://``, parsed by
  redis-py's own ``parse_url``.
- Arguments are ``bytes``, ``str`` (UTF-8) or ``int``; replies are RESP2 as hiredis returns
  them (bytes, ints, lists, ``None``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["LaneReset", "RespLane", "pack"]


class LaneReset(RedisError):
    """The command was in flight when the lane's owner dropped the connection (``reset``):
    its fate is unknown, but Redis is not known to be down because of it."""


_CRLF = b"\r\n"


def pack(args: tuple[bytes | str | int, ...]) -> bytes:
    """One RESP command (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        else:
            raise DataError(f"a Redis argument must be bytes, str or int, not {type(arg).__name__}")
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(_CRLF)
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    """The socket side of a lane: writes commands, matches replies to waiters in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.reader = hiredis.Reader(replyError=BaseParser.parse_error)
        #: (future, loop time the command was written), oldest first
        self.waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._watched: asyncio.Future[Any] | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        waiters = self.waiters
        try:
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if not waiters:  # a reply nobody asked for: the stream is not ours any more
                    raise hiredis.ProtocolError("unexpected reply")
                future, _ = waiters.popleft()
                if future.done():  # its caller was cancelled: drop the reply, keep the order
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except hiredis.ProtocolError as error:
            self.abort(RedisConnectionError(f"Redis protocol error: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        error = RedisConnectionError(
            f"Connection to Redis lost: {exc}" if exc else "Connection closed by Redis"
        )
        self._fail(error)

    # ---- commands -----------------------------------------------------------------------
    def send(self, data: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        if self.closed or self.transport is None:
            future.set_exception(RedisConnectionError("Connection to Redis is closed"))
            return future
        self.waiters.append((future, self.loop.time()))
        self.transport.write(data)
        if self._timer is None:
            self._arm()
        return future

    def _arm(self) -> None:
        future, sent = self.waiters[0]
        self._watched = future
        self._timer = self.loop.call_at(sent + self.timeout, self._check)

    def _check(self) -> None:
        """The watched command's deadline: still unanswered → the connection is stuck."""
        self._timer = None
        if not self.waiters:
            return
        future, sent = self.waiters[0]
        if future is self._watched and self.loop.time() >= sent + self.timeout:
            self.abort(RedisTimeoutError(f"No reply from Redis within {self.timeout} s"))
            return
        self._arm()  # the watched one was answered: watch the oldest still in flight

    # ---- teardown -----------------------------------------------------------------------
    def abort(self, error: Exception) -> None:
        """Drop the connection now; every command in flight fails with ``error``."""
        self._fail(error)
        if self.transport is not None and not self.loop.is_closed():
            self.transport.abort()

    def _fail(self, error: Exception) -> None:
        self.closed = True
        waiters, self.waiters = self.waiters, deque()
        if self.loop.is_closed():  # nobody can be waiting any more, and nothing can run
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future, _ in waiters:
            if not future.done():
                future.set_exception(error)

    def abort_from_anywhere(self, error: Exception) -> None:
        """``abort`` from any thread or loop: at once on its own loop, else scheduled there."""
        if self.closed:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.abort(error)
        elif self.loop.is_closed():
            self._fail(error)
        else:
            self.loop.call_soon_threadsafe(self.abort, error)


class RespLane:
    """A pipelined connection to the Redis at ``url``; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float = 1.0,
        connect_timeout: float = 0.5,
        resolve: Callable[[], Awaitable[tuple[str, int]]] | None = None,
    ) -> None:
        """``resolve``: where to connect, asked before each connection (Sentinel's primary),
        instead of the host and port of ``url``."""
        self.url = url
        self._resolve = resolve
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        params = parse_url(url)
        self._host = str(params.get("host", "localhost"))
        self._port = int(params.get("port", 6379))
        self._path: str | None = params.get("path")
        self._db = int(params.get("db", 0) or 0)
        self._username: str | None = params.get("username")
        self._password: str | None = params.get("password")
        self._ssl = _ssl_context(params) if url.startswith("rediss://") else None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    @property
    def connected(self) -> bool:
        protocol = self._protocol
        return protocol is not None and not protocol.closed

    async def execute(self, *args: bytes | str | int) -> Any:
        """Send one command and wait for its reply (error replies are raised)."""
        data = pack(args)
        protocol = self._protocol
        if protocol is None or protocol.closed or protocol.loop is not asyncio.get_running_loop():
            protocol = await self._connect()
        return await protocol.send(data)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        attempt = self._connecting
        if attempt is None or attempt.done() or attempt.get_loop() is not loop:
            attempt = self._connecting = loop.create_task(self._attempt(loop), name="resp.connect")
            attempt.add_done_callback(_retrieve)
        # shield: a caller cancelled while waiting leaves; the attempt goes on for the others
        return await asyncio.shield(attempt)

    async def _attempt(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        try:
            protocol = await asyncio.wait_for(self._open(loop), self.connect_timeout)
        except Exception as error:
            raise _connect_error(error) from error
        previous, self._protocol = self._protocol, protocol
        if previous is not None:  # a broken one, or one of another loop: let it go
            previous.abort_from_anywhere(LaneReset("Connection to Redis replaced"))
        return protocol

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        def factory() -> _Protocol:
            return _Protocol(loop, self.socket_timeout)

        if self._path:
            _, protocol = await loop.create_unix_connection(factory, self._path)
        else:
            host, port = (await self._resolve()) if self._resolve else (self._host, self._port)
            _, protocol = await loop.create_connection(
                factory, host, port, ssl=self._ssl,
                server_hostname=host if self._ssl is not None else None,
            )  # fmt: skip
        try:
            if self._password is not None:
                credentials = (
                    (self._username, self._password) if self._username else (self._password,)
                )
                await protocol.send(pack(("AUTH", *credentials)))
            if self._db:
                await protocol.send(pack(("SELECT", self._db)))
        except BaseException:
            protocol.abort(RedisConnectionError("Redis handshake failed"))
            raise
        return protocol

    def reset(self) -> None:
        """Drop the current connection (if any); the next command opens a new one. For the
        gateway after an outage or a failover (``READONLY``). Commands in flight fail with
        ``LaneReset``."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.abort_from_anywhere(LaneReset("Connection to Redis reset"))

    async def close(self) -> None:
        self.reset()


def _retrieve(attempt: asyncio.Task[_Protocol]) -> None:
    """Mark a failed attempt's error as seen (every waiter may have been cancelled)."""
    if not attempt.cancelled():
        attempt.exception()


def _connect_error(error: BaseException) -> Exception:
    if isinstance(error, TimeoutError | asyncio.TimeoutError):
        return RedisTimeoutError("Timed out connecting to Redis")
    if isinstance(error, Exception) and not isinstance(error, OSError):
        return error  # an AUTH/SELECT error reply: the caller's configuration
    return RedisConnectionError(f"Cannot connect to Redis: {error}")


def _ssl_context(params: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=params.get("ssl_ca_certs"))
    requirement = str(params.get("ssl_cert_reqs", "required")).lower()
    check_hostname = str(params.get("ssl_check_hostname", "true")).lower() not in ("false", "0")
    if requirement == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = check_hostname
        context.verify_mode = ssl.CERT_OPTIONAL if requirement == "optional" else ssl.CERT_REQUIRED
    return context
