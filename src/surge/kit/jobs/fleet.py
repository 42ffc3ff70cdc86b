"""A supervisor for N worker processes: start them, restart the ones that crash, stop them
gracefully.

The children are separate interpreters (``subprocess``), not forks: each builds its own
event loop, pool and metrics files, and a crash (or ``kill -9``) of one leaves the others
and the supervisor running. A child that exits on its own is restarted with a backoff
(1 s doubling to 30 s, reset once it has stayed up for a minute), so a crash loop does not
spin. On SIGTERM/SIGINT the supervisor forwards SIGTERM, waits ``grace`` for the children
to drain (they finish or release their jobs), then SIGKILLs what is left — the leases of
anything killed expire and the jobs are re-run as stalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from surge.kit.backoff import Backoff
from surge.kit.telemetry import metrics as telemetry

log = structlog.get_logger()

RESTART_MIN = 1.0
RESTART_MAX = 30.0
STABLE_AFTER = 60.0


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    waits: Backoff = field(default_factory=lambda: Backoff(RESTART_MIN, RESTART_MAX))
    restart_at: float = 0.0
    restarts: int = field(default=0)


def run_fleet(
    command: Sequence[str],
    *,
    processes: int,
    grace: float,
    env: dict[str, str] | None = None,
    on_event: Callable[[str, int, int], None] | None = None,
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
) -> int:
    """Run ``processes`` copies of ``command`` until SIGTERM/SIGINT; returns an exit code.

    ``metrics_port``: serve the children's metrics, aggregated from the
    ``PROMETHEUS_MULTIPROC_DIR`` they write to, for a worker host that runs no API."""
    stopping = False
    exporter = _serve_metrics(metrics_host, metrics_port) if metrics_port else None

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("jobs.fleet.stopping", signal=signal.Signals(signum).name)
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    children = [_Child(i) for i in range(processes)]
    child_env = {**os.environ, **(env or {})}

    def spawn(child: _Child) -> None:
        child.process = subprocess.Popen(list(command), env=child_env)
        child.started_at = time.monotonic()
        log.info("jobs.fleet.child_started", index=child.index, pid=child.process.pid,
                 restarts=child.restarts)  # fmt: skip
        if on_event:
            on_event("started", child.index, child.process.pid)

    try:
        for child in children:
            spawn(child)
        while not stopping:
            now = time.monotonic()
            for child in children:
                process = child.process
                if process is not None and process.poll() is not None:
                    code = process.returncode
                    telemetry.mark_process_dead(process.pid)
                    if now - child.started_at > STABLE_AFTER:
                        child.waits.reset()
                    restart_in = child.waits.next()
                    log.error("jobs.fleet.child_exited", index=child.index, pid=process.pid,
                              code=code, restart_in=restart_in)  # fmt: skip
                    if on_event:
                        on_event("exited", child.index, process.pid)
                    child.process = None
                    child.restart_at = now + restart_in
                if child.process is None and now >= child.restart_at and not stopping:
                    child.restarts += 1
                    spawn(child)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(children, grace)
        if exporter is not None:
            exporter.shutdown()
    return 0


def _serve_metrics(host: str, port: int) -> Any:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client import multiprocess as prom_multiprocess

    if not telemetry.multiprocess_dir():
        raise RuntimeError("metrics_port needs PROMETHEUS_MULTIPROC_DIR (set before the fleet)")
    registry = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("jobs.fleet.metrics", url=f"http://{host}:{port}/metrics")
    return server


def _stop(children: list[_Child], grace: float) -> None:
    alive = [c.process for c in children if c.process is not None and c.process.poll() is None]
    for process in alive:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in alive:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("jobs.fleet.child_killed", pid=process.pid, grace_s=grace)
            process.kill()
            process.wait()
        telemetry.mark_process_dead(process.pid)
    log.info("jobs.fleet.stopped", children=len(children))
