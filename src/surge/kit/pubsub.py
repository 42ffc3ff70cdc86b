"""``ChannelListener``: one Redis channel listened to for the life of a process.

The one copy of what the cache's coherence, the breakers' fleet and the token revocation
list each wrote by hand (ADR 0013):

- **confirmed subscribe**: ``on_subscribed`` runs only once Redis has confirmed the
  SUBSCRIBE, so every message published after the caller takes its baseline (reads the
  counter, loads the table...) reaches it;
- **a gap signalled**: ``on_subscribed(resumed=True)`` after a reconnect means messages
  published meanwhile were lost: the caller resyncs (flushes, reloads);
- **reconnect with backoff** (``surge.kit.backoff``) while the gateway reports Redis up, and
  a wait (no polling, no timeouts) while it reports Redis down; a listener that sees the
  gateway go down drops its connection (``on_lost``) rather than trust a half-dead one;
- **clean shutdown**: ``close()`` stops the task (``cancel_until_done``) and the pub/sub
  connection is closed, not left to the garbage collector.

``on_message`` runs on the listener task for each message's data (bytes) and must not
block; ``on_idle`` runs at least every ``poll`` seconds (a place for periodic chores).

``pending()`` says, without I/O, whether bytes of the channel have reached this process
that ``on_message`` has not seen yet: in the kernel's socket buffer (one ``poll(2)`` with a
zero timeout), the stream's buffer or the parser's. The listener task runs only when the
event loop gets to it; under load, requests read before it can act on state a message
already changed (a cache's invalidation, ADR 0028). A reader that cannot afford that asks
``pending()`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from surge.kit.aio import cancel_until_done
from surge.kit.backoff import Backoff
from surge.kit.redis import RedisGateway

log = structlog.get_logger()


class ListenerLost(ConnectionError):
    """The gateway reported Redis down while we were subscribed."""


class ChannelListener:
    """Listen to ``channel`` until ``close()``; see the module docstring."""

    def __init__(
        self,
        gateway: RedisGateway,
        channel: str,
        on_message: Callable[[bytes], None],
        *,
        on_subscribed: Callable[[bool], Awaitable[None]] | None = None,
        on_lost: Callable[[BaseException], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        name: str = "listener",
        poll: float = 1.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.gateway = gateway
        self.channel = channel
        self.name = name
        self.poll = poll
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._on_lost = on_lost
        self._on_idle = on_idle
        self._backoff = backoff or Backoff(0.1, 3.0)
        self._listening = asyncio.Event()
        #: Completed subscribes (the first one, then one per reconnect).
        self.rounds = 0
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._probe: Callable[[], bool] | None = None
        gateway.on_change(self._gateway_changed)

    @property
    def listening(self) -> bool:
        """True from the end of ``on_subscribed`` until the connection is lost or closed."""
        return self._listening.is_set()

    @listening.setter
    def listening(self, value: bool) -> None:
        if value:
            self._listening.set()
        else:
            self._listening.clear()

    def pending(self) -> bool:
        """Bytes received for this channel and not yet handed to ``on_message`` (False while
        not listening: the caller's own bounds apply then)."""
        probe = self._probe
        return probe is not None and probe()

    async def wait_listening(self) -> None:
        """Return once subscribed with the caller's baseline taken (a readiness event)."""
        await self._listening.wait()

    def _gateway_changed(self, up: bool) -> None:
        if up:
            self._up.set()
        else:
            self._up.clear()

    def start(self) -> None:
        """Start listening in the background (from a running loop)."""
        if self._task is None or self._task.done():
            self._closed = False
            self._task = asyncio.get_running_loop().create_task(
                self._listen_forever(), name=f"{self.name}-pubsub"
            )

    async def close(self) -> None:
        """Stop listening and close the connection; idempotent."""
        self._closed = True
        task, self._task = self._task, None
        await cancel_until_done(task)
        self.listening = False

    async def _listen_forever(self) -> None:
        failures = 0
        while not self._closed:
            if self.gateway.is_up:
                self._up.set()
            await self._up.wait()
            pubsub = self.gateway.raw.pubsub()
            try:
                await self._subscribe(pubsub)
                resumed = self.rounds > 0
                if self._on_subscribed is not None:
                    await self._on_subscribed(resumed)
                self.rounds += 1
                self._probe = _probe(pubsub.connection)
                self.listening = True
                failures = 0
                self._backoff.reset()
                if resumed:
                    log.info("pubsub.resubscribed", listener=self.name)
                await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.listening = False
                failures += 1
                if failures == 1 or failures % 50 == 0:
                    log.warning("pubsub.lost", listener=self.name, failures=failures,
                                error=f"{type(error).__name__}: {str(error)[:200]}")  # fmt: skip
                if self._on_lost is not None:
                    self._on_lost(error)
                await asyncio.sleep(self._backoff.next())
            finally:
                self.listening = False
                self._probe = None
                await _close_quietly(pubsub)

    async def _subscribe(self, pubsub: Any) -> None:
        await pubsub.subscribe(self.channel)
        while True:  # the confirmation: from here on no message can be missed
            message = await pubsub.get_message(timeout=self.poll)
            if message is not None and message.get("type") == "subscribe":
                return
            if not self.gateway.is_up:
                raise ListenerLost("Redis reported down while subscribing")

    async def _receive(self, pubsub: Any) -> None:
        on_message, on_idle, gateway = self._on_message, self._on_idle, self.gateway
        while not self._closed:
            if on_idle is not None:
                on_idle()
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll)
            if message is not None and message.get("type") == "message":
                try:
                    on_message(message["data"])
                except Exception:
                    log.exception("pubsub.handler_failed", listener=self.name)
            if not gateway.is_up:
                raise ListenerLost("Redis reported down")


def _probe(connection: Any) -> Callable[[], bool] | None:
    """``pending()`` for one redis-py connection: its parser's buffer (hiredis or the Python
    parser), its ``StreamReader``'s, then the socket's receive queue. None when the client's
    internals are not the ones known here (then ``pending()`` is always False)."""
    try:
        stream = connection._reader
        fd = connection._writer.get_extra_info("socket").fileno()
        parser = connection._parser
    except AttributeError:
        return None
    if stream is None or fd < 0:
        return None
    rdhup = getattr(select, "POLLRDHUP", 0)  # Linux; elsewhere EOF is seen by at_eof()
    poller = select.poll()
    poller.register(fd, select.POLLIN | rdhup)
    closing = rdhup | select.POLLHUP | select.POLLERR
    has_data = getattr(getattr(parser, "_reader", None), "has_data", None)
    if has_data is None:  # the Python parser keeps what it read in _buffer from _pos

        def has_data() -> bool:
            return len(getattr(parser, "_buffer", b"")) > getattr(parser, "_pos", 0)

    def pending() -> bool:
        if stream._buffer or has_data():
            return True
        ready = poller.poll(0)
        # A closing connection is not a message: the listener's loss handling applies (and
        # memory keeps answering while Redis is away, as before).
        return bool(ready) and not ready[0][1] & closing and not stream.at_eof()

    return pending


async def _close_quietly(pubsub: Any) -> None:
    """Close a pub/sub whose connection may be broken, bounded (redis-py can wait forever on
    a connection cancelled mid-read) and shielded from a second cancellation."""
    closing = asyncio.ensure_future(pubsub.aclose())
    with contextlib.suppress(BaseException):
        async with asyncio.timeout(1):
            await asyncio.shield(closing)
    if not closing.done():
        closing.cancel()
    elif not closing.cancelled():
        closing.exception()
