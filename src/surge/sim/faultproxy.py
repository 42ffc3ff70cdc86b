"""A TCP fault proxy: what Toxiproxy does, in a page of asyncio (issue 20, ADR 0021).

Put it between Surge and a server (Redis, PostgreSQL) and the network between them breaks on
command, on a live system, with no root and no ``tc netem``:

- ``latency(seconds)``: every chunk, both ways, waits that long before it is forwarded;
- ``reset()``: every open connection is closed with a TCP RST (``SO_LINGER`` 0), as a
  crashed peer or a middlebox would; with ``refuse_new=True`` new ones are reset too;
- ``blackhole()``: connections stay open but nothing goes through either way (a partition,
  a dead route: the client learns only from its own timeouts); new ones are accepted into
  the hole. Bytes are held, not lost: after ``heal()`` they flow on, as TCP retransmits
  across a partition that ends;
- ``stop_accepting()``: the listening socket is closed, so new connections are refused
  (the server "is down") while open ones keep working until ``reset()``;
- ``heal()``: back to a clean pass-through (listening again on the same port).

Used in-process (``await FaultProxy(...).start()``), from another thread
(``ProxyThread``: its own event loop, so a busy load generator does not add latency of its
own), or as a process: ``python -m surge.sim.faultproxy --host H --port P --target
HOST:PORT`` with a control line protocol on ``--control-port`` (``latency 0.2``, ``reset``,
``blackhole``, ``refuse``, ``heal``; each answered ``ok``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, not a FIN: the peer gets ECONNRESET."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """One listening port forwarding to ``target``; faults switched on and off at will."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.delay = 0.0
        self._open = asyncio.Event()
        self._open.set()
        self.refusing = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        await self._stop_server()
        await self.reset()

    async def _stop_server(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # ---- faults ---------------------------------------------------------------------------
    async def latency(self, seconds: float) -> None:
        self.delay = max(0.0, seconds)

    @property
    def holed(self) -> bool:
        return not self._open.is_set()

    async def blackhole(self) -> None:
        self._open.clear()

    async def reset(self, *, refuse_new: bool = False) -> None:
        self.refusing = refuse_new
        for link in list(self._links):
            self._drop(link)

    async def stop_accepting(self) -> None:
        await self._stop_server()

    async def heal(self) -> None:
        self.delay, self.refusing = 0.0, False
        self._open.set()
        if self._server is None:
            await self.start()

    # ---- forwarding -----------------------------------------------------------------------
    def _drop(self, link: _Link) -> None:
        self._links.discard(link)
        for task in link.tasks:
            task.cancel()
        _rst(link.client)
        if link.upstream is not None:
            _rst(link.upstream)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.refusing:
            _rst(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._open.wait()  # accepted into the hole: connected once it heals
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                self._drop(link)
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.ensure_future(self._pipe(reader, up_writer)),
                asyncio.ensure_future(self._pipe(up_reader, writer)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            if link in self._links:
                self._links.discard(link)
                for stream in (writer, link.upstream):
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            stream.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                await self._open.wait()  # held in the hole
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


class ProxyThread:
    """Fault proxies on an event loop of their own, driven from synchronous code or another
    loop: ``add()`` starts one, ``call(proxy.reset())`` runs a fault and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.proxies: list[FaultProxy] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def add(self, target_host: str, target_port: int, *, port: int = 0) -> FaultProxy:
        proxy = self.call(FaultProxy(target_host, target_port, port=port).start())
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                self.call(proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


# ---- as a process ---------------------------------------------------------------------------
async def _control(proxy: FaultProxy, host: str, port: int) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := (await reader.readline()).decode().strip():
            verb, _, arg = line.partition(" ")
            if verb == "latency":
                await proxy.latency(float(arg or 0))
            elif verb == "reset":
                await proxy.reset(refuse_new=arg == "refuse")
            elif verb == "blackhole":
                await proxy.blackhole()
            elif verb == "refuse":
                await proxy.stop_accepting()
            elif verb == "heal":
                await proxy.heal()
            else:
                writer.write(b"error unknown command\n")
                continue
            writer.write(b"ok\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, host, port)


async def _main(args: argparse.Namespace) -> None:
    target_host, _, target_port = args.target.rpartition(":")
    proxy = await FaultProxy(target_host, int(target_port), host=args.host, port=args.port).start()
    if args.control_port:
        await _control(proxy, args.host, args.control_port)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--control-port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
