"""HTTP load for the benches that drive a server (`ping`, `privileges`), and the servers.

``load(url, seconds)`` runs wrk when it is installed (2 threads, ``connections`` keep-alive
connections), otherwise the bundled closed-loop generator below in its own process (so it
never shares an event loop or a core's GIL with the bench driver). Each connection sends a
request, reads the whole response (Content-Length framing) and sends the next: the same
closed loop as wrk. ``python -m bench._loadgen URL CONNECTIONS SECONDS`` prints one JSON
line (requests, rps, p50_ms, p99_ms, errors); a bearer token comes from
``SURGE_LOADGEN_TOKEN``.

``uvicorn_server`` and ``wait_ready`` start an app the way production does (uvloop,
httptools, N worker processes, no access log) and wait until it answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = 64
TOKEN_ENV = "SURGE_LOADGEN_TOKEN"


# ---- servers --------------------------------------------------------------------------------


def uvicorn_server(
    target: str, port: int, env: dict[str, str], *, workers: int, factory: bool
) -> subprocess.Popen[bytes]:
    """``target`` under uvicorn in its own process group (stop it with ``os.killpg``)."""
    args = [
        sys.executable, "-m", "uvicorn", target, "--port", str(port), "--workers", str(workers),
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    if factory:
        args.append("--factory")
    return subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def stop_servers(procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """SIGTERM each server's process group (its uvicorn workers too), then wait for all."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=timeout)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until ``url`` answers 200; fails fast if the server exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before answering {url}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


# ---- load -----------------------------------------------------------------------------------


def load(
    url: str, seconds: float, *, token: str | None = None, connections: int = CONNECTIONS
) -> dict[str, float]:
    """rps, p99_ms and errors (non-2xx) of ``seconds`` of closed-loop load on ``url``."""
    if shutil.which("wrk"):
        return _wrk(url, seconds, token, connections)
    env = {**os.environ, TOKEN_ENV: token or ""}
    out = subprocess.run(
        [sys.executable, "-m", "bench._loadgen", url, str(connections), str(seconds)],
        capture_output=True, text=True, check=True, cwd=ROOT, env=env,
    ).stdout  # fmt: skip
    return dict(json.loads(out.strip().splitlines()[-1]))


def _wrk(url: str, seconds: float, token: str | None, connections: int) -> dict[str, float]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    args = [wrk, "-t2", f"-c{connections}", f"-d{seconds:.0f}s", "--latency"]
    if token:
        args += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p99_ms": float(p99.group(1)) * scale,
        "errors": int(errors.group(1)) if errors else 0,
    }


async def _connection(
    host: str, port: int, request: bytes, stop_at: float, out: list[float]
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
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
        if not head.startswith(b"HTTP/1.1 2"):
            errors += 1
        out.append(time.perf_counter() - now)
    writer.close()
    return errors


async def run(
    url: str, connections: int, seconds: float, token: str | None = None
) -> dict[str, float]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (
        f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: surge-loadgen\r\n"
        f"{auth}\r\n"
    ).encode()
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()
    errors = await asyncio.gather(
        *(
            _connection(host, parts.port or 80, request, stop_at, latencies)
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
    token = os.environ.get(TOKEN_ENV) or None
    print(json.dumps(asyncio.run(run(url, connections, seconds, token))))


if __name__ == "__main__":
    main()
