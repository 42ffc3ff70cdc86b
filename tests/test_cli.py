"""The newcomer's path: `surge up` on a fresh data folder with no configuration, then Ctrl-C.

Runs the real command in a subprocess with embedded servers in a temporary folder (the
test's own), checks the endpoints the README promises, interrupts it, and verifies that
nothing it started is left running. Then `surge migrate` reuses the same folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from surge.config import Environment, Settings
from surge.kit.embedded import free_port
from tests.fixtures.servers import ROOT, wait_http
from tests.fixtures.waiting import eventually_sync


def _env(data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR"}
        and not k.startswith("SURGE_")
    }
    env["SURGE_DATA_DIR"] = str(data_dir)
    return env


def _running_under(folder: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(folder) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.timeout(180)
def test_up_serves_and_ctrl_c_leaves_nothing_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "surge.cli", "up", "--workers", "2", "--port", str(port)],
        env=_env(data_dir),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", timeout=90, proc=proc)
        health = httpx.get(f"{base}/api/health", timeout=5)
        assert health.status_code == 200, health.text
        assert health.json()["checks"] == {"database": True, "redis": True}
        assert httpx.get(f"{base}/livez").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 200
        for _ in range(20):
            httpx.get(f"{base}/livez")
        # two web processes, one exposition: the counts add up across processes (each
        # process flushes its batched request metrics every second)
        metrics = ""

        def counted() -> bool:
            nonlocal metrics
            metrics = httpx.get(f"{base}/metrics").text
            livez = 'http_requests_total{method="GET",route="/livez",status="200"}'
            count = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith(livez)
            )
            return count >= 21

        eventually_sync(counted, timeout=5, interval=0.2, message="/livez requests not counted")
        assert "http_request_duration_seconds_bucket" in metrics
        assert 'db_pool_connections{pool="primary"}' in metrics
        assert httpx.get(f"{base}/docs").status_code == 200
        pg_pid = int((data_dir / "postgres" / "pgdata" / "postmaster.pid").read_text().split()[0])
        redis_pid = int((data_dir / "redis" / "redis.pid").read_text().strip())
        assert psutil.pid_exists(pg_pid)
        assert psutil.pid_exists(redis_pid)
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            code = proc.wait(timeout=60)
        finally:
            log.close()
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output[-3000:]
    eventually_sync(
        lambda: (
            not (
                psutil.pid_exists(pg_pid)
                or psutil.pid_exists(redis_pid)
                or _running_under(data_dir)
            )
        ),
        timeout=10,
        message="something of this run still running",
    )
    assert not psutil.pid_exists(pg_pid), "embedded PostgreSQL left running"
    assert not psutil.pid_exists(redis_pid), "embedded Redis left running"
    assert not _running_under(data_dir), "a process of this run is still alive"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/livez", timeout=1)

    # Running again reuses .data: same cluster, same port, schema already there.
    port_before = json.loads((data_dir / "postgres" / "surge.json").read_text())["port"]
    again = subprocess.run(
        [sys.executable, "-m", "surge.cli", "migrate"],
        env=_env(data_dir),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "up to date" in again.stderr
    assert json.loads((data_dir / "postgres" / "surge.json").read_text())["port"] == port_before
    assert not _running_under(data_dir)


def test_doctor_checks_external_servers(server_urls: tuple[str, str]) -> None:
    env = {**os.environ, "DATABASE_URL": server_urls[0], "REDIS_URL": server_urls[1]}
    result = subprocess.run(
        [sys.executable, "-m", "surge.cli", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Each server reached and its version reported (embedded: 16 / 6.2; external: any).
    assert re.search(r"PostgreSQL \d+", result.stderr), result.stderr[-2000:]
    assert re.search(r"Redis \d+\.\d+", result.stderr), result.stderr[-2000:]
    assert "********" in result.stderr  # SECRET_KEY masked
    # ...and only secrets: a reset link's lifetime is not one, a missing replica is not set.
    assert re.search(r"AUTH_PASSWORD_RESET_TTL\W+0:30:00", result.stderr), result.stderr
    assert re.search(r"DATABASE_REPLICA_URLS\W+\(not set\)", result.stderr), result.stderr


def test_doctor_fails_when_a_server_is_unreachable(server_urls: tuple[str, str]) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": server_urls[0],
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "surge.cli", "doctor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1


def test_production_refuses_default_secret() -> None:
    with pytest.raises(ValueError, match="SURGE_SECRET_KEY"):
        Settings(ENV=Environment.production, DATABASE_URL="", REDIS_URL="")
    with pytest.raises(ValueError, match="SURGE_SECRET_KEY"):
        Settings(ENV=Environment.production, SECRET_KEY="short")
    ok = Settings(ENV=Environment.production, SECRET_KEY="x" * 40)
    assert ok.is_production


def test_urls_are_normalised_and_split() -> None:
    s = Settings(
        DATABASE_URL="postgres://u:p@h:5432/d",
        DATABASE_REPLICA_URLS="postgresql://u@r1/d, postgresql://u@r2/d",
    )
    assert s.DATABASE_URL == "postgresql+asyncpg://u:p@h:5432/d"
    assert s.DATABASE_REPLICA_URLS == ["postgresql+asyncpg://u@r1/d", "postgresql+asyncpg://u@r2/d"]


def test_up_help_shows_the_real_port_default() -> None:
    """Issue 12: ``surge up --help`` said the port default was 0."""
    from typer.testing import CliRunner

    from surge.cli import app

    result = CliRunner().invoke(app, ["up", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    port_line = next(line for line in result.output.splitlines() if "--port" in line)
    assert "8000" in port_line, port_line
    assert "default: 0" not in port_line, port_line


def test_a_command_never_stops_servers_it_did_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: ``surge doctor``/``migrate``/``seed-demo`` run while ``surge up`` runs found
    that stack's embedded servers, recorded them as started, and stopped them on exit."""
    from surge.cli import resolve_servers
    from surge.config import settings
    from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis

    pg = EmbeddedPostgres(tmp_path / "postgres", durable=False)
    redis = EmbeddedRedis(tmp_path / "redis")
    pg.start()  # what `surge up` started
    redis.start()
    try:
        for name, value in (("DATA_DIR", tmp_path), ("DATABASE_URL", ""), ("REDIS_URL", "")):
            monkeypatch.setattr(settings, name, value)
        for name in ("DATABASE_URL", "REDIS_URL"):  # resolve_servers exports both: restore
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
        servers = resolve_servers()  # a second command on the same data folder
        assert servers.database_url == pg.url
        assert servers.redis_url == redis.url
        assert servers.started == []
        servers.stop()
        assert pg.pid() is not None, "the other command's PostgreSQL was stopped"
        assert redis.pid() is not None, "the other command's Redis was stopped"
    finally:
        redis.stop()
        pg.stop()
