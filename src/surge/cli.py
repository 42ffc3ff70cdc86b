"""``surge``: up, serve, worker, migrate, seed-demo, bench, doctor, alert-rules.

Heavy imports happen inside the commands: ``PROMETHEUS_MULTIPROC_DIR`` must be set before
prometheus_client is first imported, and ``surge --help`` should answer instantly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

app = typer.Typer(
    name="surge",
    help="Surge: API, workers and embedded servers on one machine, or any part of it.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

if TYPE_CHECKING:
    from collections.abc import Callable

    from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis
    from surge.kit.supervise import ChildProcess, Supervisor

PROJECT_ROOT = Path(__file__).resolve().parents[2]


# ---- embedded servers --------------------------------------------------------------------
@dataclass
class Servers:
    """The PostgreSQL and Redis this command uses; the embedded ones it started, to stop."""

    database_url: str
    redis_url: str
    started: list[object] = field(default_factory=list)

    def stop(self) -> None:
        for server in reversed(self.started):
            stop = getattr(server, "stop", None)
            if stop is not None:
                try:
                    stop()
                except Exception as error:
                    console.print(f"[red]could not stop {type(server).__name__}: {error}")
        self.started.clear()


def resolve_servers() -> Servers:
    """Use DATABASE_URL / REDIS_URL when set; otherwise start embedded servers in DATA_DIR."""
    from surge.config import settings
    from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis

    servers = Servers(settings.DATABASE_URL, settings.REDIS_URL)
    if not servers.database_url:
        with console.status("Starting embedded PostgreSQL (first run initialises it)..."):
            pg = EmbeddedPostgres(settings.DATA_DIR / "postgres")
            servers.database_url = pg.start()
        if pg.started_here:  # a server found running (surge up's) is not ours to stop
            servers.started.append(pg)
        how = "embedded" if pg.started_here else "embedded, already running"
        console.print(f"[green]✓[/] PostgreSQL ({how}) on 127.0.0.1:{pg.port}")
    else:
        console.print(f"[green]✓[/] PostgreSQL (external) {_mask_url(servers.database_url)}")
    if not servers.redis_url:
        with console.status("Starting embedded Redis..."):
            redis = EmbeddedRedis(settings.DATA_DIR / "redis")
            servers.redis_url = redis.start()
        if redis.started_here:
            servers.started.append(redis)
        how = "embedded" if redis.started_here else "embedded, already running"
        console.print(f"[green]✓[/] Redis ({how}) on 127.0.0.1:{redis.port}")
    else:
        console.print(f"[green]✓[/] Redis (external) {_mask_url(servers.redis_url)}")
    # Child processes and this one read the same values from here on.
    os.environ["DATABASE_URL"] = servers.database_url
    os.environ["REDIS_URL"] = servers.redis_url
    settings.DATABASE_URL = servers.database_url
    settings.REDIS_URL = servers.redis_url
    return servers


def _mask_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable url>"


def run_migrations(url: str) -> int:
    from sqlalchemy.engine import make_url

    from surge.kit.db import migrate

    try:
        created = migrate.ensure_database(url)
    except Exception as error:  # unreachable, bad credentials...: one line, not a traceback
        root: BaseException = error
        while root.__cause__ is not None:
            root = root.__cause__
        console.print(
            f"[red]✗ PostgreSQL at {_mask_url(url)}: {type(root).__name__}: {root}[/]\n"
            "  Check DATABASE_URL (unset it to use the embedded server), then `surge doctor`."
        )
        raise typer.Exit(1) from None
    if created:
        console.print(f"[green]✓[/] Created database {make_url(url).database}")
    pending = migrate.pending_revisions(url)
    if not pending:
        console.print("[green]✓[/] Database schema up to date")
        return 0
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("Applying migrations", total=len(pending))
        migrate.upgrade(url, on_step=lambda rev: progress.update(task, advance=1, description=rev))
    console.print(f"[green]✓[/] Applied {len(pending)} migration(s)")
    return len(pending)


def _prepare_metrics_dir() -> None:
    from surge.config import settings

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = (settings.DATA_DIR / "metrics").resolve()
    import shutil

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


# ---- commands ----------------------------------------------------------------------------
#: The real defaults come from the settings (SURGE_PORT / SURGE_HOST), so --help says so.
PortOption = Annotated[
    int | None, typer.Option(help="HTTP port.", show_default="$SURGE_PORT, else 8000")
]
HostOption = Annotated[
    str | None, typer.Option(help="Bind address.", show_default="$SURGE_HOST, else 127.0.0.1")
]


@app.command()
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
        wait_for_port(host, port, timeout=20)
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


def _seed_demo() -> None:
    import importlib
    import importlib.util

    if importlib.util.find_spec("surge.demo") is None:
        return
    demo = importlib.import_module("surge.demo")
    demo.seed(console)


@app.command()
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


@app.command()
def migrate() -> None:
    """Apply pending database migrations (with a progress bar)."""
    servers = resolve_servers()
    try:
        run_migrations(servers.database_url)
    finally:
        servers.stop()


# ---- console: alert rules from the settings (issue 16) ---------------------------------
ALERT_RULES_FILE = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"


def alert_rules_text(settings: object) -> str:
    """The committed rules file: the kit's rules, then each domain's (one source each)."""
    from surge.config import Settings
    from surge.kit.telemetry.prometheus_rules import rules_from_settings
    from surge.notifications.alerts import alert_rules as notification_rules

    assert isinstance(settings, Settings)
    return rules_from_settings(settings, extra=notification_rules(settings))


@app.command("alert-rules")
def alert_rules(
    write: Annotated[
        bool, typer.Option("--write", help="Write deploy/prometheus/alerts.yml instead of stdout")
    ] = False,
) -> None:
    """Print (or write) the Prometheus alerting rules generated from the ALERT_* settings."""
    from surge.config import Settings

    text = alert_rules_text(Settings())
    if write:
        ALERT_RULES_FILE.write_text(text)
        console.print(f"wrote {ALERT_RULES_FILE.relative_to(PROJECT_ROOT)}")
    else:
        sys.stdout.write(text)


@app.command()
def worker(
    processes: Annotated[int, typer.Option(help="Worker processes (default JOBS_PROCESSES).")] = 0,
    concurrency: Annotated[
        int, typer.Option(help="Jobs at once per process (default JOBS_CONCURRENCY).")
    ] = 0,
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues (default: every registered queue).")
    ] = "",
    metrics_port: Annotated[
        int, typer.Option(help="Serve the fleet's aggregated Prometheus metrics here (0: off).")
    ] = 0,
    servers_: Annotated[
        bool,
        typer.Option("--servers/--no-servers", help="Start embedded servers if no URL is set."),
    ] = True,
) -> None:
    """The job worker fleet: N processes × C jobs, crashed processes restarted, graceful
    stop on SIGTERM / Ctrl-C (running jobs finish or go back to the queue)."""
    import shutil

    from surge.config import settings

    own_metrics_dir = None
    if metrics_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # A folder of this fleet's own: another fleet or `surge up` may share DATA_DIR.
        own_metrics_dir = (settings.DATA_DIR / f"metrics-worker-{os.getpid()}").resolve()
        shutil.rmtree(own_metrics_dir, ignore_errors=True)
        own_metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(own_metrics_dir)
    from surge.kit.jobs.fleet import run_fleet  # after the metrics folder is chosen

    servers = resolve_servers() if servers_ else None
    try:
        if servers is not None and servers.started:  # a dev machine's embedded servers:
            run_migrations(servers.database_url)  # bring the schema along
        command = [sys.executable, "-m", "surge.worker"]
        if concurrency:
            command += ["--concurrency", str(concurrency)]
        if queues:
            command += ["--queues", queues]
        count = processes or settings.JOBS_PROCESSES
        console.print(f"[green]✓[/] Job workers: {count} process(es)")
        run_fleet(
            command, processes=count, grace=settings.JOBS_SHUTDOWN_GRACE.total_seconds() + 2,
            metrics_port=metrics_port, metrics_host=settings.HOST,
        )  # fmt: skip
    finally:
        if servers is not None:
            servers.stop()
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


@app.command("seed-demo")
def seed_demo() -> None:
    """Load the demo data (idempotent)."""
    servers = resolve_servers()
    try:
        run_migrations(servers.database_url)
        _seed_demo()
    finally:
        servers.stop()


@app.command()
def load(
    scenario: Annotated[
        str, typer.Argument(help="A file in bench/load/scenarios/: seed003, seed003_writes, ping.")
    ] = "seed003",
    *,
    users: Annotated[
        int, typer.Option(help="Signed-in users, one keep-alive connection each.")
    ] = 10_000,
    population: Annotated[int, typer.Option(help="Users in the database (bulk SQL).")] = 300_000,
    think: Annotated[
        str, typer.Option(help="Mean think time between a user's requests (5s, 500ms).")
    ] = "5s",
    duration: Annotated[str, typer.Option(help="Steady phase measured (after the ramp).")] = "60s",
    ramp: Annotated[str, typer.Option(help="Users start spread over this long.")] = "20s",
    processes: Annotated[int, typer.Option(help="Generator processes.")] = 2,
    workers: Annotated[int, typer.Option(help="Surge web processes.")] = 2,
    seed: Annotated[int, typer.Option(help="Population, plan mix and schedules.")] = 3,
    capacity: Annotated[
        bool, typer.Option("--capacity", help="Then search the highest rate meeting the targets.")
    ] = False,
    step_duration: Annotated[str, typer.Option(help="Steady phase of each capacity step.")] = "30s",
) -> None:
    """Open-loop load on a fresh Surge: seed 003's users, latency from the intended start,
    JSON as the last line (bench/results/load-SCENARIO.json) and an HTML report beside it."""
    sys.path.insert(0, str(PROJECT_ROOT))
    from bench.load.main import Options, run

    run(Options(scenario=scenario, users=users, population=population, think=_seconds(think),
                duration=_seconds(duration), ramp=_seconds(ramp), processes=processes,
                workers=workers, seed=seed, capacity=capacity,
                step_duration=_seconds(step_duration)))  # fmt: skip


def _seconds(value: str) -> float:
    """``5s``, ``500ms``, ``2m`` or a bare number of seconds."""
    text = value.strip().lower()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


@app.command()
def bench(
    name: Annotated[
        str, typer.Argument(help="ping | cache | ratelimit | jobs | breaker | ... | all")
    ],
    quick: Annotated[bool, typer.Option(help="Shorter runs (smoke test, noisier).")] = False,
) -> None:
    """Run a benchmark from bench/ side by side with its baseline; writes bench/results/NAME.json
    (a --quick run writes bench/results/quick/NAME.json instead)."""
    import importlib

    sys.path.insert(0, str(PROJECT_ROOT))
    from bench import common

    common.QUICK = quick  # quick runs write bench/results/quick/, never the committed figures
    names = _bench_names() if name == "all" else [name]
    for bench_name in names:
        try:
            module = importlib.import_module(f"bench.{bench_name}")
        except ModuleNotFoundError as error:
            raise typer.BadParameter(
                f"no benchmark {bench_name!r} (have: {', '.join(_bench_names())})"
            ) from error
        module.main(quick=quick)


def _bench_names() -> list[str]:
    folder = PROJECT_ROOT / "bench"
    return sorted(
        p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and p.stem != "common"
    )


@app.command()
def doctor() -> None:
    """Print the effective configuration (secrets masked) and check every server, with timings."""
    from surge.config import settings

    table = Table(title="Effective configuration", show_lines=False)
    table.add_column("setting")
    table.add_column("value")
    for key, value in settings.model_dump().items():
        shown = str(value)
        if "SECRET" in key or "PASSWORD" in key:
            shown = "********"
        elif key.endswith("_URL") and value:
            shown = _mask_url(str(value))
        elif key.endswith("_URLS"):
            shown = ", ".join(_mask_url(v) for v in value)
        table.add_row(key, shown or "[dim](embedded)")
    console.print(table)
    servers = resolve_servers()
    try:
        import asyncio

        results = asyncio.run(_doctor_checks(servers.database_url, servers.redis_url))
    finally:
        servers.stop()
    checks = Table(title="Connectivity")
    for column in ("server", "ok", "ms", "detail"):
        checks.add_column(column)
    failed = False
    for server, ok, ms, detail in results:
        failed |= not ok
        checks.add_row(server, "[green]yes" if ok else "[red]no", f"{ms:.1f}", detail)
    console.print(checks)
    if failed:
        raise typer.Exit(1)


async def _doctor_checks(database_url: str, redis_url: str) -> list[tuple[str, bool, float, str]]:
    import redis.asyncio as redis_async
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from surge.config import settings
    from surge.kit.db import migrate

    out: list[tuple[str, bool, float, str]] = []
    for label, url in [("postgresql primary", database_url)] + [
        (f"postgresql replica {i}", u) for i, u in enumerate(settings.DATABASE_REPLICA_URLS)
    ]:
        started = time.perf_counter()
        engine = create_async_engine(url, connect_args={"timeout": 5})
        try:
            async with engine.connect() as conn:
                version = (await conn.execute(text("SHOW server_version"))).scalar_one()
            detail = f"PostgreSQL {version}"
            ok = True
        except Exception as error:
            detail, ok = f"{type(error).__name__}: {error}"[:120], False
        finally:
            await engine.dispose()
        out.append((label, ok, (time.perf_counter() - started) * 1000, detail))
    started = time.perf_counter()
    client = redis_async.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        info = await client.info("server")
        out.append(
            (
                "redis",
                True,
                (time.perf_counter() - started) * 1000,
                f"Redis {info['redis_version']}",
            )
        )
    except Exception as error:
        out.append(("redis", False, (time.perf_counter() - started) * 1000, str(error)[:120]))
    finally:
        await client.aclose()
    try:
        import asyncio

        pending = await asyncio.to_thread(migrate.pending_revisions, database_url)
        out.append(
            ("migrations", not pending, 0.0, f"{len(pending)} pending" if pending else "up to date")
        )
    except Exception as error:
        out.append(("migrations", False, 0.0, str(error)[:120]))
    return out


from surge.cluster.commands import app as cluster_app  # noqa: E402  (issue 18)

app.add_typer(cluster_app, name="cluster")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
