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

app.command()(servers.up)
app.command()(servers.serve)
app.command()(admin.migrate)
app.command("alert-rules")(admin.alert_rules)
app.command()(admin.worker)
app.command("seed-demo")(admin.seed_demo)
app.command()(bench.load)
app.command()(bench.bench)
app.command()(admin.doctor)
# ---- sub-apps of other modules: one line each ---------------------------------------------
app.add_typer(cluster_app, name="cluster")  # issue 18 (ADR 0022)


def main() -> None:
    app()
