"""HTTP load for the benches that drive a server (`ping`, `privileges`), and the servers.

``load(url, seconds)`` runs ``bench.load``'s closed loop: 2 generator processes (wrk's
``-t2``), ``connections`` keep-alive connections in all, each sending its next request as
soon as the previous answer is read, latencies in an HdrHistogram. The connections are raw
asyncio protocols on uvloop: cheap enough per request that the generator leaves the server
the same share of the 2 cores as wrk does, so the ratios agree with wrk's (ADR 0015).
``SURGE_LOADGEN=wrk`` uses wrk instead when it is installed; ``SURGE_LOADGEN=both`` makes
``surge bench ping`` measure with both, interleaved in one run, and report both ratios: on
this noisy machine only pairs measured in the same window can be compared.

``tokens=[...]`` sends ``Authorization: Bearer`` with those tokens in turn, one request after
the other (wrk: a Lua ``request()``), so the load comes from that many callers. A run that
compares two URLs should pass the same tokens to both: the load generator then does the
same work for each, and only the server's work differs.

``uvicorn_server`` and ``wait_ready`` start an app the way production does (uvloop,
httptools or Surge's protocol on it, N worker processes, no access log) and wait until it
answers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from surge.config import Settings

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = 64
#: ``SURGE_LOADGEN=wrk``: use wrk instead (to check that both give the same figures).
LOADGEN_ENV = "SURGE_LOADGEN"
#: Generator processes: as many as wrk's threads in the reference runs (``-t2``).
GENERATOR_PROCESSES = 2


# ---- servers --------------------------------------------------------------------------------


def uvicorn_server(
    target: str,
    port: int,
    env: dict[str, str],
    *,
    workers: int,
    factory: bool,
    log: Path | None = None,
    http: str = "httptools",
) -> subprocess.Popen[bytes]:
    """``target`` under uvicorn in its own process group (stop it with ``os.killpg``); its
    output appended to ``log`` when given, else discarded.

    With ``surge serve``'s keep-alive and listen backlog (``HTTP_KEEPALIVE_TIMEOUT``,
    ``HTTP_BACKLOG``), not uvicorn's: uvicorn closes an idle connection after 5 s, exactly
    httpx's own keep-alive expiry, so a client reusing a connection idle for ~5 s raced
    the server's close and read a reset instead of an answer (ADR 0053).

    ``http``: uvicorn's HTTP protocol, ``httptools`` or an import path; Surge runs as
    ``surge serve`` runs it with ``surge.kit.web.protocol.PROTOCOL`` (ADR 0056)."""
    settings = Settings(**_env_settings(env))
    args = [
        sys.executable, "-m", "uvicorn", target, "--port", str(port), "--workers", str(workers),
        "--loop", "uvloop", "--http", http, "--no-access-log", "--log-level", "warning",
        "--timeout-keep-alive", str(int(settings.HTTP_KEEPALIVE_TIMEOUT.total_seconds())),
        "--backlog", str(settings.HTTP_BACKLOG),
    ]  # fmt: skip
    if factory:
        args.append("--factory")
    if log is None:
        return subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _env_settings(env: dict[str, str]) -> dict[str, Any]:
    """The HTTP settings ``env`` sets for the server (``SURGE_HTTP_*``), as Settings fields."""
    prefix = "SURGE_"
    return {
        name[len(prefix) :]: value
        for name, value in env.items()
        if name in (f"{prefix}HTTP_KEEPALIVE_TIMEOUT", f"{prefix}HTTP_BACKLOG")
    }


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
    generator: str | None = None,
) -> dict[str, float]:
    """rps, p99_ms and errors (non-2xx) of ``seconds`` of closed-loop load on ``url``.

    ``bench.load``'s closed loop (2 processes, raw asyncio protocols on uvloop) unless
    ``SURGE_LOADGEN=wrk`` asks for wrk (installed): the cross-check that both agree."""
    if token is not None:
        tokens = [token]
    if (generator or os.environ.get(LOADGEN_ENV)) == "wrk" and shutil.which("wrk"):
        return _wrk(url, seconds, tokens or [], connections)
    from bench.load.runner import closed

    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return closed(
        parts.hostname or "127.0.0.1", parts.port or 80, path or "/", seconds,
        connections=connections, processes=GENERATOR_PROCESSES, tokens=tokens or [],
    )  # fmt: skip


def cross_check_wrk() -> bool:
    """``SURGE_LOADGEN=both`` and wrk installed: measure with both generators."""
    return os.environ.get(LOADGEN_ENV) == "both" and shutil.which("wrk") is not None


def generator_name() -> str:
    """What ``load`` uses, for the bench's JSON."""
    if os.environ.get(LOADGEN_ENV) == "wrk" and shutil.which("wrk"):
        return "wrk -t2"
    return f"bench.load closed loop ({GENERATOR_PROCESSES} processes)"


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
