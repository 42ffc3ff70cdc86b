"""``surge up`` (everything, supervised) and ``surge serve`` (the API alone)."""

from __future__ import annotations

import importlib.util
import json
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
    workers: Annotated[
        int, typer.Option(help="Web processes.", show_default="$SURGE_WEB_WORKERS, else CPUs")
    ] = 0,
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
    if not _port_free(host, port):
        # Found now, not after a minute of start-up as "api exited with 1".
        console.print(
            f"[red]✗ {host}:{port} is already in use (another `surge up` or `make run`?): stop "
            f"it, or pick another port with --port or SURGE_PORT"
        )
        raise typer.Exit(1)
    from surge.kit.embedded import reserve_port

    # The API binds last: no embedded server or simulator may take its port meanwhile.
    reserve_port(port)
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
        python = sys.executable
        simulators = _start_simulators(host or "127.0.0.1", settings.DATA_DIR)
        children += [(name, child) for name, child, _ in simulators]
        if seed:
            # After the simulators: the demo registers the proxies where they listen now.
            _seed_demo(fresh_settings=True)
        serve_cmd = [python, "-m", "surge.cli", "serve", "--workers", str(workers),
                     "--port", str(port), "--host", host, "--no-servers"]  # fmt: skip
        commands = [("api", serve_cmd)]
        if _has_jobs() and job_processes > 0:
            commands.append(("worker", [python, "-m", "surge.cli", "worker", "--processes",
                                        str(job_processes), "--no-servers"]))  # fmt: skip
        supervisor, supervised = _supervise(servers, commands, simulators=simulators)
        children[:] = _running(supervised)
        _wait_for_http(host, port, timeout=60, children=children)
        console.print(
            Panel.fit(
                _where_to_look(host, port, settings.DATA_DIR, seeded=seed)
                + f"\nProcesses   {workers} web"
                + (f", {job_processes} job worker" if len(children) > 1 else "")
                + "\n\nCtrl-C stops everything.",
                title="[bold green]Surge is up",
            )
        )
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


def _where_to_look(host: str, port: int, data_dir: Path, *, seeded: bool) -> str:
    """The lines of the "Surge is up" panel: every URL opens as printed, and the demo
    sign-ins work as printed (README, "The two commands"). Under 76 columns: the panel
    fits an 80-column terminal unwrapped."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    base = f"http://{shown}:{port}"
    lines = [
        f"API docs    {base}/docs         (OpenAPI: try every route)",
        f"Console     {base}/admin",
        f"Panel       {base}/panel        (the reseller panel)",
        f"Health      {base}/api/health   (also /livez, /readyz)",
        f"Metrics     {base}/metrics",
    ]
    if seeded and importlib.util.find_spec("surge.demo") is not None:
        from surge.demo import DEMO_PASSWORD, email

        lines += [
            "",
            f"Sign in     {email('admin')}       console (it enrols a second factor)",
            f"            {email('reseller1')}   panel",
            "            auditor, alice, bob, carol, partner1, partner2: same domain",
            f"Password    {DEMO_PASSWORD}   (every demo user)",
            f"E-mails     {data_dir / 'smtp-sim'}/   (what the local SMTP relay received)",
        ]
    return "\n".join(lines)


# ---- supervision of `surge up` (chaos, ADR 0021) ---------------------------------------------
def _supervise(
    servers: Servers,
    commands: list[tuple[str, list[str]]],
    *,
    simulators: list[tuple[str, subprocess.Popen[bytes], list[str]]],
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
    for name, running, restart in simulators:  # already started (ports in the environment)
        adopted = ChildProcess(name, restart)
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


def _start_simulators(
    host: str, data_dir: Path
) -> list[tuple[str, subprocess.Popen[bytes], list[str]]]:
    """Start every ``surge.sim.SIMULATORS`` entry on a free port; point Surge at it.

    Returns (name, process, the command that restarts it where it listens). The settings each
    one returns go into this process's environment, which the API and worker processes
    started next inherit. A simulator whose URL setting is already set (an external server
    configured by the operator) is not started."""
    from surge.kit.embedded import EmbeddedServerError, free_port
    from surge.sim import SIMULATORS

    started: list[tuple[str, subprocess.Popen[bytes], list[str]]] = []
    data_dir.mkdir(parents=True, exist_ok=True)
    for sim in SIMULATORS:
        if any(os.environ.get(key) for key in sim.env(host, 0)):
            console.print(f"[dim]{sim.name}: configured externally, not started")
            continue
        ready = (data_dir / f"sim-{sim.name}.json").resolve() if sim.ready_file else None
        try:
            for _attempt in range(3):
                port = free_port()
                cmd = [sys.executable, "-m", sim.module, "--host", host, "--port", str(port),
                       *sim.args, *(["--ready-file", str(ready)] if ready else [])]  # fmt: skip
                if ready is not None:
                    ready.unlink(missing_ok=True)
                child = subprocess.Popen(cmd, start_new_session=True)
                started.append((f"sim:{sim.name}", child, cmd))
                if _listening(child, port, ready, timeout=20):
                    break
                started.pop()
                _stop_children([(sim.name, child)], grace=2)
                console.print(
                    f"[yellow]simulator {sim.name} exited with {child.returncode} before "
                    f"listening on {host}:{port} (taken meanwhile?); trying another port"
                )
            else:
                raise EmbeddedServerError(f"simulator {sim.name} did not start (output above)")
        except BaseException:
            _stop_children([(n, c) for n, c, _ in started], grace=5)  # the caller never sees them
            raise
        env = sim.env(host, port)
        if ready is not None:
            report = json.loads(ready.read_text())
            env = {str(k): str(v) for k, v in report["env"].items()}
            started[-1] = (started[-1][0], child, [*cmd, *map(str, report["args"])])
            if env != sim.env(host, port):
                console.print(f"[yellow]simulator {sim.name}: its usual ports are taken (another "
                              f"run on this machine?); this run uses {', '.join(env.values())}")  # fmt: skip
        os.environ.update(env)
        console.print(f"[green]✓[/] simulator {sim.name} on {host}:{port}")
    return started


def _listening(
    child: subprocess.Popen[bytes], port: int, ready: Path | None, *, timeout: float
) -> bool:
    """True once ``child`` itself listens on ``port`` (and wrote ``ready``, if any); False
    when it exited first. Someone else's socket on that port is never taken for it."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        try:
            ports = {
                c.laddr.port
                for c in psutil.Process(child.pid).net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            }
        except psutil.Error:
            ports = set()
        if port in ports and (ready is None or ready.exists()):
            return True
        time.sleep(0.05)
    from surge.kit.embedded import EmbeddedServerError

    _stop_children([("simulator", child)], grace=2)
    raise EmbeddedServerError(f"simulator on port {port} not listening after {timeout:.0f}s")


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


def _port_free(host: str, port: int) -> bool:
    """Whether the API could listen on ``host:port`` (bound the way uvicorn binds it)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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
    console.print(f"[red]✗ the API did not answer http://{host}:{port}/readyz in {timeout:.0f}s")
    raise typer.Exit(1)


def _has_jobs() -> bool:
    import importlib.util

    return importlib.util.find_spec("surge.worker") is not None


def serve(
    workers: Annotated[
        int, typer.Option(help="Web processes.", show_default="$SURGE_WEB_WORKERS, else CPUs")
    ] = 0,
    port: PortOption = None,
    host: HostOption = None,
    servers_: Annotated[
        bool,
        typer.Option("--servers/--no-servers", help="Start embedded servers if no URL is set."),
    ] = True,
) -> None:
    """The API alone: N uvicorn processes (uvloop + httptools, one write per response: ADR
    0056), graceful drain on SIGTERM."""
    from surge.config import settings

    servers = resolve_servers() if servers_ else None
    workers = workers or settings.WEB_WORKERS
    _prepare_metrics_dir()
    _warn_somaxconn(settings.HTTP_BACKLOG)
    import uvicorn

    from surge.kit.web.protocol import PROTOCOL as ONE_WRITE_PROTOCOL

    try:
        uvicorn.run(
            "surge.app:create_app",
            factory=True,
            host=host or settings.HOST,
            port=port or settings.PORT,
            workers=workers,
            loop="uvloop",
            # uvicorn's httptools protocol, each fixed-length response in one write (ADR 0056).
            http=ONE_WRITE_PROTOCOL,
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
