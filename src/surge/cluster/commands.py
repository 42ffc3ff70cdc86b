"""The ``surge cluster`` sub-app: thin wrappers over ``surge.cluster.control``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from surge.cluster.control import Cluster, ClusterError, load_config, teardown
from surge.cluster.topology import ClusterConfig

app = typer.Typer(help="A PostgreSQL/Redis HA cluster with several Surge nodes, on this machine.")
console = Console(stderr=True)
ROOT = Path(".data/cluster")


@app.command()
def up(
    api_nodes: Annotated[int, typer.Option(help="Surge API nodes behind nginx.")] = 2,
    synchronous: Annotated[
        bool, typer.Option("--sync/--async", help="Patroni synchronous_mode.")
    ] = True,
) -> None:
    """Network namespaces, etcd ×3, Patroni ×2, HAProxy, PgBouncer, Redis + Sentinel ×3,
    Surge API nodes + a worker, nginx. Fails (and cleans up) if any tier does not come up."""
    config = ClusterConfig(root=ROOT.resolve(), api_nodes=api_nodes, synchronous=synchronous)
    cluster = Cluster(config)
    try:
        timings = cluster.up(say=lambda line: console.print(f"[green]✓[/] {line}"))
    except ClusterError as error:
        console.print(f"[red]cluster up failed:[/] {error}")
        console.print(f"logs are in {ROOT}/<host>/; `surge cluster down` removes everything")
        raise typer.Exit(1) from error
    console.print(f"[green]✓[/] cluster up in {timings['total']} s: {config.base_url}")
    _print_status(cluster)


@app.command()
def down() -> None:
    """Kill every cluster process, delete the namespaces and the bridge, remove the state."""
    removed = teardown(ROOT.resolve())
    console.print(f"[green]✓[/] removed {len(removed)} namespaces/links/folders")


@app.command()
def status() -> None:
    """Role, address, health and lag of every host."""
    _print_status(Cluster(load_config(ROOT.resolve())))


def _print_status(cluster: Cluster) -> None:
    table = Table("host", "address", "role", "health", "lag / detail")
    for row in cluster.status():
        style = (
            "green"
            if row["health"] in {"ok", "ready", "running"}
            else ("green" if row["health"] in {"running", "streaming"} else "yellow")
        )
        table.add_row(row["host"], row["address"], row["role"],
                      f"[{style}]{row['health']}[/]", str(row["lag"]))  # fmt: skip
    Console().print(table)
