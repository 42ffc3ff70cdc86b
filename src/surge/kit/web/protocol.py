"""``OneWriteProtocol``: uvicorn's httptools protocol, writing a fixed-length response once.

uvicorn writes every response in at least two ``transport.write`` calls: the status line and
headers on ``http.response.start``, the body on ``http.response.body``. On uvloop a write to
a socket with nothing queued is sent at once, so a small answer costs two ``write`` system
calls, two loopback segments and two wake-ups of the client; in a loaded worker that write
path was the largest self time, in Surge and in a bare FastAPI app alike (ADR 0049).

This protocol holds the head of a response that declares its ``Content-Length`` until the
first body message and writes both in one call. Everything else is uvicorn's own code and
behaviour: the header checks, keep-alive, pipelining, flow control, ``100 Continue``. A
response without a ``Content-Length`` (a chunked stream, server-sent events) and the answer
to a ``HEAD`` are not held: their head goes out at once, as before. A head still held when
the connection is closed (an app that fails after starting its response) is written first.

It relies on two details of uvicorn's ``httptools_impl`` (``tests/kit/test_protocol.py`` pins
the version in the lock, 0.54.0): ``HttpToolsProtocol._start_asgi_task(cycle, app)`` runs
once per request before its cycle does, and a ``RequestResponseCycle`` writes only through
``cycle.transport`` (``write``, ``close``, ``is_closing``). ``surge serve`` runs it (ADR 0056).
"""

from __future__ import annotations

import asyncio

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

#: ``uvicorn --http`` / ``uvicorn.run(http=...)`` name of the protocol.
PROTOCOL = "surge.kit.web.protocol:OneWriteProtocol"

#: Above this size a held head and the body go out as two buffers of one ``writelines``
#: instead of one copied ``bytes``.
_JOIN_BELOW = 64 * 1024


class _OneWrite(asyncio.Transport):
    """What a cycle writes through: the real transport, holding a response's head until
    its body. One per connection; ``armed`` is the cycle whose head is still to come."""

    __slots__ = ("armed", "held", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self.transport = transport
        self.armed: RequestResponseCycle | None = None
        self.held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self.held
        if held is not None:  # the body (or its first chunk) after a held head
            self.held = None
            if len(data) < _JOIN_BELOW:
                self.transport.write(held + data)
            else:
                self.transport.writelines((held, data))
            return
        cycle = self.armed
        if cycle is not None and cycle.response_started:  # this write is the head
            self.armed = None
            # uvicorn has read the headers by now: False means a Content-Length, so the
            # body follows. A HEAD answer has no body write to join.
            if cycle.chunked_encoding is False and cycle.scope["method"] != "HEAD":
                self.held = bytes(data)
                return
        self.transport.write(data)

    def release(self) -> None:
        """Write a held head now (the connection is closing)."""
        held = self.held
        if held is not None:
            self.held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        self.release()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class OneWriteProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol with one write per fixed-length response."""

    _one_write: _OneWrite

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._one_write = _OneWrite(transport)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        writer = self._one_write
        writer.armed = cycle
        cycle.transport = writer
        super()._start_asgi_task(cycle, app)
