"""``surge``: up, serve, worker, migrate, seed-demo, bench, load, doctor, alert-rules.

A package: ``_common`` (console, servers, migrations), ``servers`` (up, serve), ``admin``
(migrate, alert-rules, worker, seed-demo, doctor), ``bench`` (load, bench). Each command is
a plain function registered here, one line each; a new group of commands is a
``typer.Typer()`` sub-app in a module of its own, added here with one line.

Heavy imports happen inside the commands: ``PROMETHEUS_MULTIPROC_DIR`` must be set before
prometheus_client is first imported, and ``surge --help`` should answer instantly.
"""

from __future__ import annotations

import typer

from surge.cli import admin, bench, servers
from surge.cli._common import Servers, console, resolve_servers, run_migrations
from surge.cli.admin import alert_rules_text
from surge.cluster.commands import app as cluster_app

__all__ = ["Servers", "alert_rules_text", "app", "console", "main", "resolve_servers",
           "run_migrations"]  # fmt: skip

app = typer.Typer(
    name="surge",
    help="Surge: API, workers and embedded servers on one machine, or any part of it.",
    no_args_is_help=True,
    add_completion=False,
)


def _examples(*lines: str) -> str:
    """A command's ``--help`` epilog: one example a line (blank lines keep them apart)."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


app.command(epilog=_examples(
    "surge up                      # everything, on embedded servers in .data/",
    "SURGE_PORT=8001 surge up      # a second run beside another one",
    "surge up --no-seed --job-processes 2",
))(servers.up)  # fmt: skip
app.command(epilog=_examples(
    "surge serve --workers 4",
    "DATABASE_URL=postgresql://app@db/surge REDIS_URL=redis://cache:6379/0 surge serve --no-servers",
))(servers.serve)  # fmt: skip
app.command(epilog=_examples(
    "surge migrate                 # embedded PostgreSQL, or DATABASE_URL when set",
))(admin.migrate)  # fmt: skip
app.command("alert-rules", epilog=_examples(
    "surge alert-rules | less", "surge alert-rules --write   # deploy/prometheus/alerts.yml",
))(admin.alert_rules)  # fmt: skip
app.command(epilog=_examples(
    "surge worker                                  # JOBS_PROCESSES x JOBS_CONCURRENCY",
    "surge worker --processes 8 --concurrency 8    # seed 000's fleet",
    "surge worker --queues email,wallet --metrics-port 9108",
))(admin.worker)  # fmt: skip
app.command("seed-demo", epilog=_examples(
    "surge seed-demo     # admin, auditor, alice, bob, carol, partner1, partner2, reseller1",
))(admin.seed_demo)  # fmt: skip
app.command(epilog=_examples(
    "surge load seed003 --users 10000 --think 5s --duration 60s --capacity",
    "surge load seed003_writes",
    "surge load ping --users 2000 --think 1s",
))(bench.load)  # fmt: skip
app.command(epilog=_examples(
    "surge bench ping --quick      # a smoke run: bench/results/quick/ping.json",
    "surge bench ledger            # the committed figure: bench/results/ledger.json",
    "surge bench all",
))(bench.bench)  # fmt: skip
app.command(epilog=_examples(
    "surge doctor                  # safe while `make run` runs",
    "DATABASE_URL=postgresql://app@db/surge surge doctor",
))(admin.doctor)  # fmt: skip
# ---- sub-apps of other modules: one line each ---------------------------------------------
app.add_typer(cluster_app, name="cluster")  # issue 18 (ADR 0022)


def main() -> None:
    app()
