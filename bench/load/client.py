"""A minimal HTTP/1.1 keep-alive client on a raw asyncio ``Protocol`` (no httpx, no streams).

One ``Connection`` is one TCP connection carrying one request at a time (no pipelining),
like a browser tab or a mobile app. ``request(raw)`` writes pre-built request bytes and
returns the response's status, the headers the harness reads (``x-request-id``,
``server-timing``) and the body length. Parsing is the least that HTTP/1.1 with
``Content-Length`` framing needs; it is what makes a Python generator cheap enough to share
two cores with the server it measures (the streams-based fallback it replaces spent most of
its time in ``StreamReader``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


class ConnectionLost(Exception):
    """The server closed the connection or it broke before the whole response arrived."""


@dataclass(slots=True)
class Response:
    status: int
    request_id: str
    server_timing: str
    body: bytes
    #: True when the server answered ``Connection: close`` (the connection is now unusable).
    closing: bool


class _Protocol(asyncio.Protocol):
    def __init__(self, keep_body: bool) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.keep_body = keep_body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionLost(str(exc) if exc else "closed by server"))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.waiter is None or self.waiter.done():
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end])
        length = 0
        request_id = ""
        timing = ""
        closing = False
        lines = head.split(b"\r\n")
        for line in lines[1:]:
            colon = line.find(b":")
            name = line[:colon].lower()
            if name == b"content-length":
                length = int(line[colon + 1 :])
            elif name == b"x-request-id":
                request_id = line[colon + 1 :].strip().decode("latin-1")
            elif name == b"server-timing":
                timing = line[colon + 1 :].strip().decode("latin-1")
            elif name == b"connection":
                closing = line[colon + 1 :].strip().lower() == b"close"
        total = end + 4 + length
        if len(buffer) < total:
            return
        body = bytes(buffer[end + 4 : total]) if self.keep_body else b""
        del buffer[:total]
        status = int(lines[0][9:12])
        self.waiter.set_result(Response(status, request_id, timing, body, closing))


class Connection:
    """One keep-alive connection; ``request`` may be called again once it has returned."""

    def __init__(self, host: str, port: int, *, keep_body: bool = False) -> None:
        self.host = host
        self.port = port
        self.keep_body = keep_body
        self._protocol: _Protocol | None = None
        #: How many times this connection had to (re)connect: each is a TCP handshake the
        #: request that needed it paid for.
        self.connects = 0

    @property
    def usable(self) -> bool:
        return self._protocol is not None and not self._protocol.closed

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        keep_body = self.keep_body
        _, protocol = await loop.create_connection(
            lambda: _Protocol(keep_body), self.host, self.port
        )
        self._protocol = protocol
        self.connects += 1

    async def request(self, raw: bytes) -> Response:
        if not self.usable:
            await self.connect()
        protocol = self._protocol
        assert protocol is not None
        assert protocol.transport is not None
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        protocol.waiter = waiter
        protocol.buffer.clear()
        protocol.transport.write(raw)
        try:
            response = await waiter
        except BaseException:
            self.close()
            raise
        finally:
            protocol.waiter = None
        if response.closing:
            self.close()
        return response

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


def build_request(
    method: str,
    path: str,
    host: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    """The request's bytes, built once per (user, step) and reused for every send."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: surge-load"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in {"POST", "PUT", "PATCH"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_server_timing(value: str) -> dict[str, float]:
    """``queue;dur=0.4, app;dur=1.2`` → ``{"queue": 0.4, "app": 1.2}`` (milliseconds)."""
    out: dict[str, float] = {}
    if not value:
        return out
    for part in value.split(","):
        name, _, rest = part.strip().partition(";")
        for param in rest.split(";"):
            key, _, number = param.strip().partition("=")
            if key == "dur":
                with contextlib.suppress(ValueError):
                    out[name] = float(number)
    return out
