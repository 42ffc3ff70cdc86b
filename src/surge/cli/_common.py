"""What every command shares: the console, the servers a command uses, migrations, metrics."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

console = Console(stderr=True)

PROJECT_ROOT = Path(__file__).resolve().parents[3]


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


def _seed_demo(*, fresh_settings: bool = False) -> None:
    """Load the demo data; ``fresh_settings``: read the settings again from the environment
    (``surge up`` has pointed it at the simulators it started since)."""
    if importlib.util.find_spec("surge.demo") is None:
        return
    demo = importlib.import_module("surge.demo")
    if fresh_settings:
        from surge.config import Settings

        demo.seed(console, Settings())
    else:
        demo.seed(console)
