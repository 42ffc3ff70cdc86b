"""Egress proxies: real HTTP forward proxies on loopback, each leaving from its own address.

Proxy ``i`` (0-based) listens on ``127.0.1.(i+1):LISTEN_PORT`` and opens its outgoing connections
from ``127.0.0.(i+2)`` (Linux routes all of 127.0.0.0/8 to loopback), so the provider
simulator sees one distinct client IP per proxy, as a real site sees a proxy's address.
One process runs every listener (one ``Simulator`` entry). Absolute-URI forwarding
(``GET http://host/path``, one request per connection) and ``CONNECT`` tunnels.

    python -m surge.sim.proxies --host 127.0.0.1 --port 9200 --count 4 --listen-port 3128

(``--host:--port`` is proxy 0 too: where ``surge up`` checks the simulator is up.)

When a listen port is taken (another ``surge up`` on this machine, a test run) the proxies
take free ports instead of failing; ``--ready-file`` then tells ``surge up`` where they are
(JSON: ``env``, the settings that point Surge at them, and ``args``, the arguments that start
them again on the same ports), and ``--listen-ports`` restarts them there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from surge.sim._streams import StreamServer, read_request


def listen_address(index: int) -> str:
    return f"127.0.1.{index + 1}"


def egress_address(index: int) -> str:
    return f"127.0.0.{index + 2}"


def proxy_urls(port: int, count: int) -> list[str]:
    return [f"http://{listen_address(i)}:{port}" for i in range(count)]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@dataclass
class ForwardProxy(StreamServer):
    listen: str
    port: int
    egress: str
    handled: int = 0
    _server: asyncio.Server | None = field(default=None, repr=False)

    def _host(self) -> str:
        return self.listen

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, target, headers, body = await read_request(reader)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            writer.close()
            return
        self.handled += 1
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            await self._relay(host, int(port), b"", reader, writer, tunnel=True)
            return
        parts = urlsplit(target)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        forwarded = {k: v for k, v in headers.items() if not k.startswith("proxy-")}
        forwarded["connection"] = "close"
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in forwarded.items()
        )
        request = head.encode("latin-1") + b"\r\n" + body
        await self._relay(
            parts.hostname or "", parts.port or 80, request, reader, writer, tunnel=False
        )

    async def _relay(
        self, host: str, port: int, request: bytes, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter, *, tunnel: bool,
    ) -> None:  # fmt: skip
        try:
            up_reader, up_writer = await asyncio.open_connection(
                host, port, local_addr=(self.egress, 0)
            )
        except OSError:
            writer.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        if tunnel:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return
        up_writer.write(request)
        await up_writer.drain()
        await _pipe(up_reader, writer)
        up_writer.close()


async def start_proxies(count: int, port: int | list[int] = 0) -> list[ForwardProxy]:
    """``count`` proxies; with ``port`` 0 each gets its own free port, with a list each its
    own given one. On a failure the ones already started are stopped."""
    ports = port if isinstance(port, list) else [port] * count
    started: list[ForwardProxy] = []
    try:
        for i in range(count):
            started.append(
                await ForwardProxy(listen_address(i), ports[i], egress_address(i)).start()
            )
    except BaseException:
        for proxy in started:
            await proxy.stop()
        raise
    return started


def _write_ready(path: str, proxies: list[ForwardProxy]) -> None:
    urls = [proxy.url for proxy in proxies]
    ready = {
        "env": {"SURGE_OPERATIONS_PROXY_URLS": ",".join(urls)},
        "args": ["--listen-ports", ",".join(str(proxy.port) for proxy in proxies)],
    }
    partial = f"{path}.partial"
    with open(partial, "w") as out:
        json.dump(ready, out)
    os.replace(partial, path)  # whole or absent: the reader never sees half a file


async def _main(args: argparse.Namespace) -> None:
    if args.listen_ports:
        proxies = await start_proxies(args.count, [int(p) for p in args.listen_ports.split(",")])
    else:
        try:
            proxies = await start_proxies(args.count, args.listen_port)
        except OSError as error:
            if not args.listen_port:
                raise
            sys.stderr.write(
                f"proxies: port {args.listen_port} is taken ({error.strerror}); "
                "listening on free ports instead\n"
            )
            proxies = await start_proxies(args.count, 0)
    # Proxy 0 also answers on --host:--port, where `surge up` checks the simulator is up.
    ready = await asyncio.start_server(proxies[0]._serve, args.host, args.port)
    if args.ready_file:
        _write_ready(args.ready_file, proxies)
    try:
        await asyncio.Event().wait()
    finally:
        ready.close()
        for proxy in proxies:
            await proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Loopback egress proxies")
    parser.add_argument("--host", default="127.0.0.1", help="unused: see the module docstring")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument(
        "--listen-port", type=int, default=0,
        help="port of every 127.0.1.x listener (0: each its own free port; taken: free ports)",
    )  # fmt: skip
    parser.add_argument("--listen-ports", default="", help="one port per listener, comma-separated")
    parser.add_argument("--ready-file", default="", help="where to write the listeners (JSON)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
