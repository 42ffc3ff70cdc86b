"""A small closed-loop HTTP/1.1 keep-alive load generator, used when `wrk` is not installed.

``python -m bench._loadgen URL CONNECTIONS SECONDS`` prints one JSON line:
requests, rps, p50_ms, p99_ms, errors. Each connection sends a request, reads the whole
response (Content-Length framing), and sends the next: the same closed loop as wrk.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def _connection(host: str, port: int, path: str, stop_at: float, out: list[float]) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: surge-loadgen\r\n\r\n".encode()
    errors = 0
    while (now := time.perf_counter()) < stop_at:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            errors += 1
        out.append(time.perf_counter() - now)
    writer.close()
    return errors


async def run(url: str, connections: int, seconds: float) -> dict[str, float]:
    parts = urlsplit(url)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()
    errors = await asyncio.gather(
        *(
            _connection(
                parts.hostname or "127.0.0.1",
                parts.port or 80,
                parts.path or "/",
                stop_at,
                latencies,
            )
            for _ in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else 0.0,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0,
        "errors": sum(errors),
    }


def main() -> None:
    url, connections, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps(asyncio.run(run(url, connections, seconds))))


if __name__ == "__main__":
    main()
