"""``surge up`` (everything, supervised) and ``surge serve`` (the API alone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.panel import Panel

from surge.cli._common import (
    Servers,
    _prepare_metrics_dir,
    _seed_demo,
    console,
    resolve_servers,
    run_migrations,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis
    from surge.kit.supervise import ChildProcess, Supervisor


# ---- commands ----------------------------------------------------------------------------
#: The real defaults come from the settings (SURGE_PORT / SURGE_HOST), so --help says so.
PortOption = Annotated[
    int | None, typer.Option(help="HTTP port.", show_default="$SURGE_PORT, else 8000")
]
HostOption = Annotated[
    str | None, typer.Option(help="Bind address.", show_default="$SURGE_HOST, else 127.0.0.1")
]


def up(
    workers: Annotated[int, typer.Option(help="Web processes (default: CPU count).")] = 0,
    port: PortOption = None,
    host: HostOption = None,
    job_processes: Annotated[int, typer.Option(help="Job worker processes.")] = 1,
    seed: Annotated[bool, typer.Option(help="Load demo data (idempotent).")] = True,
) -> None:
    """Everything on this machine: servers, migrations, demo data, API and workers. Ctrl-C stops all."""
    from surge.config import settings

    workers = workers or settings.WEB_WORKERS
    port = port or settings.PORT
    host = host or settings.HOST
    # Before anything imports prometheus_client: this process counts its restarts there too.
    _prepare_metrics_dir()
    servers = resolve_servers()
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _frame: object = None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True

    previous_int = signal.signal(signal.SIGINT, stop_all)
    previous_term = signal.signal(signal.SIGTERM, stop_all)
    try:
        run_migrations(servers.database_url)
        if seed:
            _seed_demo()
        python = sys.executable
        children += _start_simulators(host or "127.0.0.1")
        serve_cmd = [python, "-m", "surge.cli", "serve", "--workers", str(workers),
                     "--port", str(port), "--host", host, "--no-servers"]  # fmt: skip
        commands = [("api", serve_cmd)]
        if _has_jobs() and job_processes > 0:
            commands.append(("worker", [python, "-m", "surge.cli", "worker", "--processes",
                                        str(job_processes), "--no-servers"]))  # fmt: skip
        supervisor, supervised = _supervise(servers, commands, simulators=children)
        children[:] = _running(supervised)
        _wait_for_http(host, port, timeout=60, children=children)
        base = f"http://{host}:{port}"
        console.print(
            Panel.fit(
                f"API         {base}\n"
                f"OpenAPI     {base}/docs\n"
                f"Health      {base}/api/health   ({base}/livez, {base}/readyz)\n"
                f"Metrics     {base}/metrics\n"
                f"Processes   {workers} web" + (f", {job_processes} job worker" if len(children) > 1 else "")
                + "\n\nCtrl-C stops everything.",
                title="[bold green]Surge is up",
            )
        )  # fmt: skip
        # ---- supervision (chaos, ADR 0021): servers and children restarted, not fatal ----
        while not stopping:
            supervisor.tick()
            children[:] = _running(supervised)
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
        # The web drain and the workers' drain run in parallel; wait for the longer one,
        # so a job finishing within JOBS_SHUTDOWN_GRACE is not killed and re-run.
        grace = max(settings.SHUTDOWN_GRACE, settings.JOBS_SHUTDOWN_GRACE).total_seconds()
        _stop_children(children, grace=grace + 5)
        servers.stop()
        console.print("[green]✓[/] Stopped; nothing left running.")


# ---- supervision of `surge up` (chaos, ADR 0021) ---------------------------------------------
def _supervise(
    servers: Servers,
    commands: list[tuple[str, list[str]]],
    *,
    simulators: list[tuple[str, subprocess.Popen[bytes]]],
) -> tuple[Supervisor, list[ChildProcess]]:
    """Start the API (and the worker fleet) under a ``Supervisor`` that also watches the
    embedded servers this command started: whatever dies is restarted with backoff, logged
    and counted (``surge_supervised_restarts_total`` on ``/metrics``)."""
    from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis
    from surge.kit.supervise import ChildProcess, Component, Supervisor

    def report(event: str, component: Component) -> None:
        if event == "down":
            console.print(f"[red]✗ {component.name} is down; restarting")
        elif event == "failed":
            console.print(
                f"[yellow]{component.name} did not start; retry in {component.backoff:.1f}s"
            )
        else:
            console.print(
                f"[green]✓[/] {component.name} restarted (restart #{component.restarts}, "
                f"down {component.outages[-1]:.1f}s)"
            )

    supervisor = Supervisor(on_event=report)
    for server in servers.started:
        if isinstance(server, EmbeddedPostgres):
            supervisor.add(Component("postgres", server.running, _starter(server)))
        elif isinstance(server, EmbeddedRedis):
            supervisor.add(Component("redis", server.running, _starter(server)))
    processes = []
    for name, running in simulators:  # already started (their ports are in the environment)
        adopted = ChildProcess(name, [str(arg) for arg in running.args])  # type: ignore[union-attr]
        adopted.process = running
        supervisor.add(adopted.component())
        processes.append(adopted)
    for name, command in commands:
        child = ChildProcess(name, command)
        child.start()
        supervisor.add(child.component())
        processes.append(child)
    return supervisor, processes


def _starter(server: EmbeddedPostgres | EmbeddedRedis) -> Callable[[], None]:
    def start() -> None:
        server.start()

    return start


def _running(processes: list[ChildProcess]) -> list[tuple[str, subprocess.Popen[bytes]]]:
    return [(c.name, c.process) for c in processes if c.process is not None]


def _start_simulators(host: str) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """Start every ``surge.sim.SIMULATORS`` entry on a free port; point Surge at it.

    The settings each one returns go into this process's environment, which the API and
    worker processes started next inherit. A simulator whose URL setting is already set
    (an external server configured by the operator) is not started."""
    from surge.kit.embedded import free_port, wait_for_port
    from surge.sim import SIMULATORS

    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    for sim in SIMULATORS:
        port = free_port()
        env = sim.env(host, port)
        if any(os.environ.get(key) for key in env):
            console.print(f"[dim]{sim.name}: configured externally, not started")
            continue
        cmd = [sys.executable, "-m", sim.module, "--host", host, "--port", str(port), *sim.args]
        child = subprocess.Popen(cmd, start_new_session=True)
        started.append((f"sim:{sim.name}", child))
        try:
            wait_for_port(host, port, timeout=20)
        except BaseException:
            _stop_children(started, grace=5)  # the caller never sees them: stop them here
            raise
        os.environ.update(env)
        console.print(f"[green]✓[/] simulator {sim.name} on {host}:{port}")
    return started


def _stop_children(children: list[tuple[str, subprocess.Popen[bytes]]], grace: float) -> None:
    for _, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name, child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{name} did not stop in {grace:.0f}s; killing it")
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _wait_for_http(
    host: str, port: int, *, timeout: float, children: list[tuple[str, subprocess.Popen[bytes]]]
) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    with console.status("Waiting for the API to be ready..."):
        while time.monotonic() < deadline:
            for name, child in children:
                if child.poll() is not None:
                    raise typer.Exit(f"{name} exited with {child.returncode} during start-up")  # type: ignore[arg-type]
            try:
                if httpx.get(f"http://{host}:{port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise typer.Exit(1)


def _has_jobs() -> bool:
    import importlib.util

    return importlib.util.find_spec("surge.worker") is not None


def serve(
    workers: Annotated[int, typer.Option(help="Web processes (default: CPU count).")] = 0,
    port: PortOption = None,
    host: HostOption = None,
    servers_: Annotated[
        bool,
        typer.Option("--servers/--no-servers", help="Start embedded servers if no URL is set."),
    ] = True,
) -> None:
    """The API alone: N uvicorn processes (uvloop + httptools), graceful drain on SIGTERM."""
    from surge.config import settings

    servers = resolve_servers() if servers_ else None
    workers = workers or settings.WEB_WORKERS
    _prepare_metrics_dir()
    _warn_somaxconn(settings.HTTP_BACKLOG)
    import uvicorn

    try:
        uvicorn.run(
            "surge.app:create_app",
            factory=True,
            host=host or settings.HOST,
            port=port or settings.PORT,
            workers=workers,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=int(settings.SHUTDOWN_GRACE.total_seconds()),
            backlog=settings.HTTP_BACKLOG,
            timeout_keep_alive=int(settings.HTTP_KEEPALIVE_TIMEOUT.total_seconds()),
            # Surge resolves the client address itself (TRUSTED_PROXIES, ClientIpResolver);
            # uvicorn's X-Forwarded-* rewrite was a second pass per request (ADR 0016).
            proxy_headers=False,
        )
    finally:
        if servers is not None:
            servers.stop()


def _warn_somaxconn(backlog: int) -> None:
    """The kernel silently caps the listen backlog at net.core.somaxconn: say so."""
    try:
        cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return
    if cap < backlog:
        console.print(
            f"[yellow]listen backlog {backlog} is capped by net.core.somaxconn = {cap}; "
            f"raise it (sysctl -w net.core.somaxconn={backlog}) for connection storms"
        )
