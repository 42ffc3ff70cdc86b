"""What every loopback simulator that speaks over asyncio streams shares: bind (port 0: a
free one), its URL, and a bounded stop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self


class StreamServer:
    """``await start()`` binds ``_host():port`` and serves each connection with ``_serve``;
    ``await stop()`` closes it, waiting two seconds at most for connections to end."""

    port: int
    _server: asyncio.Server | None

    def _host(self) -> str:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://{self._host()}:{self.port}"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self._host(), self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    """One HTTP/1.1 request: method, target, headers (lower-case names), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return method, target, headers, body
