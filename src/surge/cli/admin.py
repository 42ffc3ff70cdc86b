"""Operating commands: migrate, alert-rules, worker, seed-demo, doctor."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from surge.cli._common import (
    PROJECT_ROOT,
    _mask_url,
    _seed_demo,
    console,
    resolve_servers,
    run_migrations,
)


def migrate() -> None:
    """Apply pending database migrations (with a progress bar)."""
    servers = resolve_servers()
    try:
        run_migrations(servers.database_url)
    finally:
        servers.stop()


# ---- alert rules from the settings (issue 16) -----------------------------------------
ALERT_RULES_FILE = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"


def alert_rules_text(settings: object) -> str:
    """The committed rules file: the kit's rules, then each domain's (one source each)."""
    from surge.config import Settings
    from surge.kit.telemetry.prometheus_rules import rules_from_settings
    from surge.notifications.alerts import alert_rules as notification_rules

    assert isinstance(settings, Settings)
    return rules_from_settings(settings, extra=notification_rules(settings))


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


def worker(
    processes: Annotated[
        int, typer.Option(help="Worker processes.", show_default="$SURGE_JOBS_PROCESSES, else 2")
    ] = 0,
    concurrency: Annotated[
        int,
        typer.Option(
            help="Jobs at once per process.", show_default="$SURGE_JOBS_CONCURRENCY, else 8"
        ),
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


def seed_demo() -> None:
    """Load the demo data (idempotent)."""
    servers = resolve_servers()
    try:
        run_migrations(servers.database_url)
        _seed_demo()
    finally:
        servers.stop()


def doctor() -> None:
    """Print the effective configuration (secrets masked) and check every server, with timings."""
    from surge.config import settings

    table = Table(title="Effective configuration", show_lines=False)
    table.add_column("setting")
    table.add_column("value")
    from surge.sim import SIMULATORS

    # Empty, these are filled by the servers and simulators `surge up` starts; any other
    # empty setting is just not set (no replica, no SMTP user...).
    embedded = {"DATABASE_URL", "REDIS_URL"} | {
        key.removeprefix("SURGE_") for sim in SIMULATORS for key in sim.env("127.0.0.1", 0)
    }
    for key, value in settings.model_dump().items():
        shown = str(value)
        # AUTH_PASSWORD_RESET_TTL is no secret; NOTIFY_SMTP_PASSWORD and PAYMENTS_API_KEY are.
        if "SECRET" in key or key.endswith(("PASSWORD", "_KEY", "_KEYS")):
            shown = "********" if value else ""
        elif key.endswith("_URL") and value:
            shown = _mask_url(str(value))
        elif key.endswith("_URLS"):
            shown = ", ".join(_mask_url(v) for v in value)
        table.add_row(key, shown or ("[dim](embedded)" if key in embedded else "[dim](not set)"))
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
