"""HTTP load for the benches that drive a server (`ping`, `privileges`), and the servers.

``load(url, seconds)`` runs wrk when it is installed (2 threads, ``connections`` keep-alive
connections), otherwise the bundled closed-loop generator below in its own process (so it
never shares an event loop or a core's GIL with the bench driver). Each connection sends a
request, reads the whole response (Content-Length framing) and sends the next: the same
closed loop as wrk. ``python -m bench._loadgen URL CONNECTIONS SECONDS`` prints one JSON
line (requests, rps, p50_ms, p99_ms, errors); bearer tokens come from
``SURGE_LOADGEN_TOKEN`` (several: separated by spaces).

``tokens=[...]`` sends ``Authorization: Bearer`` with those tokens in turn, one request after
the other (wrk: a Lua ``request()``), so the load comes from that many callers. A run that
compares two URLs should pass the same tokens to both: the load generator then does the
same work for each, and only the server's work differs.

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
import tempfile
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
    url: str,
    seconds: float,
    *,
    token: str | None = None,
    tokens: list[str] | None = None,
    connections: int = CONNECTIONS,
) -> dict[str, float]:
    """rps, p99_ms and errors (non-2xx) of ``seconds`` of closed-loop load on ``url``."""
    if token is not None:
        tokens = [token]
    if shutil.which("wrk"):
        return _wrk(url, seconds, tokens or [], connections)
    env = {**os.environ, TOKEN_ENV: " ".join(tokens or ())}
    out = subprocess.run(
        [sys.executable, "-m", "bench._loadgen", url, str(connections), str(seconds)],
        capture_output=True, text=True, check=True, cwd=ROOT, env=env,
    ).stdout  # fmt: skip
    return dict(json.loads(out.strip().splitlines()[-1]))


#: wrk's per-request hook when several callers take turns (tokens are base64url: no quoting).
_ROTATE_LUA = """
local tokens = {%s}
local n = 0
request = function()
  n = n %% #tokens + 1
  return wrk.format(nil, nil, {["Authorization"] = "Bearer " .. tokens[n]})
end
"""


def _wrk(url: str, seconds: float, tokens: list[str], connections: int) -> dict[str, float]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    args = [wrk, "-t2", f"-c{connections}", f"-d{seconds:.0f}s", "--latency"]
    with tempfile.TemporaryDirectory(prefix="surge-wrk-") as folder:
        if len(tokens) == 1:
            args += ["-H", f"Authorization: Bearer {tokens[0]}"]
        elif tokens:
            script = Path(folder) / "rotate.lua"
            script.write_text(_ROTATE_LUA % ", ".join(f'"{t}"' for t in tokens))
            args += ["-s", str(script)]
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
    url: str, connections: int, seconds: float, tokens: list[str] | None = None
) -> dict[str, float]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"

    def request(i: int) -> bytes:  # connection i speaks for caller i (mod the callers)
        auth = f"Authorization: Bearer {tokens[i % len(tokens)]}\r\n" if tokens else ""
        return (
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}\r\n"
            f"User-Agent: surge-loadgen\r\n{auth}\r\n"
        ).encode()

    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()
    errors = await asyncio.gather(
        *(
            _connection(host, parts.port or 80, request(i), stop_at, latencies)
            for i in range(connections)
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
    tokens = os.environ.get(TOKEN_ENV, "").split() or None
    sys.stdout.write(json.dumps(asyncio.run(run(url, connections, seconds, tokens))) + "\n")


if __name__ == "__main__":
    main()
