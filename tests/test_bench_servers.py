"""The servers the benches start keep an idle keep-alive connection open longer than a
client keeps it (ADR 0053): with uvicorn's default 5 s, equal to httpx's keep-alive
expiry, a client reusing a connection idle for ~5 s raced the server's close and read a
reset instead of an answer (``surge bench payments`` died on an httpx ``ReadError``)."""

from __future__ import annotations

import asyncio
import os

import httpx
from bench._loadgen import ROOT, stop_servers, uvicorn_server, wait_ready

from surge.kit.embedded import free_port

#: How long httpx (the benches' client) keeps an idle connection for reuse.
CLIENT_KEEPALIVE = httpx.Limits().keepalive_expiry or 5.0


async def test_an_idle_connection_outlives_the_clients_keep_alive() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = uvicorn_server("bench._bare_app:app", port, env, workers=1, factory=False)
    try:
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/livez", server)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /livez HTTP/1.1\r\nHost: bench\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )  # fmt: skip
            await reader.readexactly(length)
            # The server's close is the event waited for; it must not come while a client
            # could still pick the connection for its next request.
            try:
                closed = await asyncio.wait_for(reader.read(1), CLIENT_KEEPALIVE + 1)
            except TimeoutError:
                closed = None
            assert closed is None, f"the server closed the idle connection first ({closed!r})"
            writer.write(b"GET /livez HTTP/1.1\r\nHost: bench\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        stop_servers([server])
