"""Bring the cluster up, look at it, break it, take it down (root: ``ip netns`` + veth).

Every process runs inside its host's namespace (``ip netns exec``), so ``down`` finds them
all with ``ip netns pids`` — including any a test restarted — kills them, deletes the
namespaces (their veth pairs go with them) and the bridge, and removes the state folder.
PostgreSQL, Patroni and PgBouncer refuse to run as root: they run as the system user the
embedded PostgreSQL already uses (``surgepg``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import structlog

from surge.cluster.topology import (
    APP_USER,
    BRIDGE,
    DB_NAME,
    GATEWAY,
    NS_PREFIX,
    PG_SUPERUSER,
    SENTINEL_MASTER,
    ClusterConfig,
    Host,
)
from surge.kit.embedded import PG_SYSTEM_USER, _system_user

log = structlog.get_logger()

#: The processes this Python process started (reaped by ``teardown``: a test's process must
#: not leave zombies nor drop a running ``Popen``).
_SPAWNED: list[subprocess.Popen[bytes]] = []

REQUIRED = ("etcd", "patroni", "haproxy", "pgbouncer", "redis-server", "redis-sentinel", "nginx")


class ClusterError(RuntimeError):
    """The cluster cannot be brought up (or a step of it failed); the message says why."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def wait_until(predicate: Callable[[], object], within: float, what: str) -> float:
    """Poll ``predicate`` every 100 ms; seconds it took, or ``ClusterError`` after ``within``."""
    started = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - started
        except Exception:  # a server that is still starting: not yet
            pass
        if time.monotonic() - started > within:
            raise ClusterError(f"{what}: not within {within:.0f} s")
        time.sleep(0.1)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


# ---- network ---------------------------------------------------------------------------
def namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NS_PREFIX)]


def make_network(config: ClusterConfig) -> None:
    if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
    for host in config.hosts:
        _run("ip", "netns", "add", host.netns)
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
             "netns", host.netns)  # fmt: skip
        _run("ip", "link", "set", host.veth, "master", BRIDGE)
        _run("ip", "link", "set", host.veth, "up")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")


def partition(host: Host, *, cut: bool) -> None:
    """Cut ``host`` off the bridge (its processes keep running, nobody reaches them), or heal."""
    _run("ip", "link", "set", host.veth, "down" if cut else "up")


def sentinel_primary(sentinel: Host) -> str:
    """``host:port`` of the Redis primary ``sentinel`` names now ("" if it names none)."""
    import redis

    client = redis.Redis(host=sentinel.address, port=26379, socket_timeout=1)
    try:
        found = client.execute_command(  # type: ignore[no-untyped-call]
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER
        )
    finally:
        client.close()
    return ":".join(x.decode() if isinstance(x, bytes) else str(x) for x in found or [])


def pids_in(netns: str) -> list[int]:
    out = _run("ip", "netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split()]


def kill_host(host: Host, sig: int = signal.SIGKILL) -> list[int]:
    """Signal every process of ``host`` (a host crash with SIGKILL)."""
    pids = pids_in(host.netns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def crash_host(host: Host) -> list[int]:
    """A machine crash: ``host``'s link goes down, then SIGKILL to every process of it. The
    link first, because the kernel outlives the processes here: TCP data a killed process
    left in its socket buffers would still be sent (WAL a standby receives from a primary
    that is already dead, making asynchronous replication look safer than it is). Bring it
    back with ``partition(host, cut=False)`` before restarting its servers."""
    partition(host, cut=True)
    return kill_host(host)


def teardown(root: Path) -> list[str]:
    """Kill everything in the cluster's namespaces, delete them and the bridge, remove
    ``root``. Safe to run on a half-built cluster or twice."""
    removed = []
    spaces = namespaces()
    for netns in spaces:
        for pid in pids_in(netns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for netns in spaces:
        deadline = time.monotonic() + 10
        while pids_in(netns) and time.monotonic() < deadline:
            time.sleep(0.05)
        _run("ip", "netns", "del", netns, check=False)
        removed.append(netns)
    while _SPAWNED:
        proc = _SPAWNED.pop()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        _run("ip", "link", "del", BRIDGE, check=False)
        removed.append(BRIDGE)
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
        removed.append(str(root))
    return removed


# ---- processes -------------------------------------------------------------------------
def _pg_user() -> pwd.struct_passwd:
    user = _system_user()
    if user is None:
        raise ClusterError("`surge cluster up` runs as root (network namespaces)")
    return user


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for folder, _dirs, files in os.walk(path):
        os.chown(folder, user.pw_uid, user.pw_gid)
        for name in files:
            os.chown(Path(folder) / name, user.pw_uid, user.pw_gid)


def spawn(
    config: ClusterConfig,
    host: Host,
    command: Sequence[str],
    *,
    as_pg_user: bool = False,
    env: dict[str, str] | None = None,
    log_name: str = "out.log",
) -> int:
    """Start ``command`` in ``host``'s namespace, detached, output appended to its log."""
    folder = config.folder(host)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = ["ip", "netns", "exec", host.netns]
    if as_pg_user:
        prefix += ["runuser", "-u", PG_SYSTEM_USER, "--"]
    with (folder / log_name).open("ab") as out:
        proc = subprocess.Popen(
            [*prefix, *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=folder if as_pg_user else None,
        )
    _SPAWNED.append(proc)
    return proc.pid


@dataclass
class Cluster:
    config: ClusterConfig

    @property
    def root(self) -> Path:
        return self.config.root

    # ---- up ---------------------------------------------------------------------------
    def check_tools(self) -> None:
        missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
        if missing:
            raise ClusterError(f"missing {', '.join(missing)}: run `make cluster-deps`")
        if os.geteuid() != 0:
            raise ClusterError("`surge cluster up` needs root (ip netns)")

    def up(self, say: Callable[[str], None] = print) -> dict[str, float]:
        """Every tier, in dependency order; seconds each took."""
        self.check_tools()
        if namespaces():
            raise ClusterError("a cluster is already up: `surge cluster down` first")
        timings: dict[str, float] = {}
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.json").write_text(
            json.dumps({"api_nodes": self.config.api_nodes, "synchronous": self.config.synchronous})
        )
        make_network(self.config)
        say("network: bridge + one namespace per host")
        for step in (
            self.start_etcd, self.start_postgres, self.start_routing, self.start_redis,
            self.migrate, self.start_surge, self.start_nginx,
        ):  # fmt: skip
            began = time.monotonic()
            label = step()
            timings[label] = round(time.monotonic() - began, 2)
            say(f"{label}: {timings[label]} s")
        timings["total"] = round(time.monotonic() - started, 2)
        return timings

    def start_etcd(self) -> str:
        for host in self.config.of("etcd"):
            self.config.folder(host).mkdir(parents=True, exist_ok=True)
            spawn(self.config, host, self.config.etcd_command(host))
        for host in self.config.of("etcd"):
            wait_until(partial(http_ok, f"http://{host.address}:2379/health"), 30,
                       f"etcd {host.name}")  # fmt: skip
        return "etcd ×3"

    def start_patroni(self, host: Host) -> None:
        user = _pg_user()
        folder = self.config.folder(host)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "patroni.yml").write_text(self.config.patroni_config(host))
        _chown_tree(folder, user)
        os.chmod(folder, 0o700)
        spawn(self.config, host, ["patroni", str(folder / "patroni.yml")], as_pg_user=True)

    def start_postgres(self) -> str:
        first, *others = self.config.of("postgres")
        self.start_patroni(first)
        wait_until(partial(http_ok, f"http://{first.address}:8008/primary"), 90,
                   f"Patroni {first.name} as leader")  # fmt: skip
        for host in others:
            self.start_patroni(host)
        for host in others:
            wait_until(partial(http_ok, f"http://{host.address}:8008/replica"), 120,
                       f"Patroni {host.name} as replica")  # fmt: skip
        asyncio.run(self._create_database(first.address))
        return f"PostgreSQL 15 + Patroni ×{1 + len(others)}"

    async def _create_database(self, address: str) -> None:
        import asyncpg  # type: ignore[import-untyped]

        su, su_pw = PG_SUPERUSER
        user, password = APP_USER
        conn = await asyncpg.connect(
            host=address, port=5432, user=su, password=su_pw, database="postgres", timeout=5
        )
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user):
                await conn.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
            # PgBouncer refuses statement_timeout as a startup parameter: set it on the role.
            await conn.execute(f"ALTER ROLE {user} SET statement_timeout = '30s'")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME):
                await conn.execute(f"CREATE DATABASE {DB_NAME} OWNER {user}")
        finally:
            await conn.close()

    def start_routing(self) -> str:
        haproxy = self.config.host("haproxy")
        folder = self.config.folder(haproxy)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "haproxy.cfg").write_text(self.config.haproxy_config())
        spawn(self.config, haproxy, ["haproxy", "-db", "-f", str(folder / "haproxy.cfg")])
        bouncer = self.config.host("pgbouncer")
        folder = self.config.folder(bouncer)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pgbouncer.ini").write_text(self.config.pgbouncer_config())
        (folder / "userlist.txt").write_text(self.config.pgbouncer_users())
        _chown_tree(folder, _pg_user())
        spawn(self.config, bouncer, ["pgbouncer", str(folder / "pgbouncer.ini")], as_pg_user=True)
        asyncio.run(self._wait_sql(self.config.database_url, 30, "PgBouncer → HAProxy → primary"))
        return "HAProxy + PgBouncer"

    async def _wait_sql(self, url: str, within: float, what: str) -> None:
        import asyncpg

        dsn = url.replace("postgresql+asyncpg://", "postgresql://")
        deadline = time.monotonic() + within
        while True:
            try:
                conn = await asyncpg.connect(dsn, timeout=2, statement_cache_size=0)
                try:
                    await conn.fetchval("SELECT 1")
                    return
                finally:
                    await conn.close()
            except Exception as error:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{what}: {error}") from error
                await asyncio.sleep(0.2)

    def start_redis(self) -> str:
        for host in self.config.of("redis"):
            self.config.folder(host).mkdir(parents=True, exist_ok=True)
            spawn(self.config, host, self.config.redis_command(host))
        for host in self.config.of("sentinel"):
            folder = self.config.folder(host)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "sentinel.conf").write_text(self.config.sentinel_config(host))
            spawn(self.config, host, ["redis-sentinel", str(folder / "sentinel.conf")])
        import redis

        replica = self.config.host("redis2")

        def replica_linked() -> bool:
            info = redis.Redis(host=replica.address, socket_timeout=1).info("replication")
            return bool(info.get("master_link_status") == "up")

        wait_until(replica_linked, 30, "Redis replica linked")
        for host in self.config.of("sentinel"):
            wait_until(partial(sentinel_primary, host), 30, f"Sentinel {host.name}")
        return "Redis primary + replica + Sentinel ×3"

    def surge_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "surge.cli", *args]

    def node_env(self, host: Host) -> dict[str, str]:
        return {**self.config.surge_env(), "SURGE_DATA_DIR": str(self.config.folder(host))}

    def migrate(self) -> str:
        env = {
            **os.environ,
            **self.config.surge_env(),
            "DATABASE_URL": self.config.direct_primary_url,
        }
        env.pop("DATABASE_REPLICA_URLS", None)
        result = subprocess.run(
            self.surge_command("migrate"), env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ClusterError(f"surge migrate: {result.stderr[-2000:]}")
        return "migrations"

    def start_api(self, host: Host) -> None:
        command = self.surge_command(
            "serve", "--no-servers", "--host", host.address, "--port", "8000",
            "--workers", str(self.config.web_processes),
        )  # fmt: skip
        spawn(self.config, host, command, env=self.node_env(host))

    def start_surge(self) -> str:
        for host in self.config.of("api"):
            self.start_api(host)
        worker = self.config.host("worker")
        # The job engine runs its one-statement operations in autocommit, which PgBouncer's
        # transaction pooling cannot carry (asyncpg's Parse and Execute may reach different
        # servers): the worker node talks to HAProxy's primary endpoint directly.
        env = {**self.node_env(worker), "DATABASE_URL": self.config.direct_primary_url,
               "SURGE_DB_PGBOUNCER": "false"}  # fmt: skip
        env.pop("DATABASE_REPLICA_URLS")  # (its reads use the primary)
        spawn(self.config, worker, self.surge_command("worker", "--no-servers", "--processes", "1"),
              env=env)  # fmt: skip
        for host in self.config.of("api"):
            wait_until(partial(http_ok, f"http://{host.address}:8000/readyz"), 90,
                       f"Surge {host.name} ready")  # fmt: skip
        return f"Surge API ×{len(self.config.of('api'))} + worker"

    def start_nginx(self) -> str:
        host = self.config.host("nginx")
        folder = self.config.folder(host)
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        (folder / "nginx.conf").write_text(self.config.nginx_config())
        spawn(self.config, host, ["nginx", "-c", str(folder / "nginx.conf"), "-p", str(folder)])
        wait_until(lambda: http_ok(f"{self.config.base_url}/readyz"), 30, "nginx → Surge")
        return "nginx"

    # ---- status -----------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """One row per host: role, address, health, lag (what each server says of itself)."""
        rows = []
        for host in self.config.hosts:
            alive = bool(pids_in(host.netns)) if host.netns in namespaces() else False
            row: dict[str, Any] = {"host": host.name, "address": host.address,
                                   "role": host.role, "health": "down", "lag": ""}  # fmt: skip
            if alive:
                try:
                    row.update(self._probe(host))
                except Exception as error:
                    row["health"] = f"unreachable ({type(error).__name__})"
            rows.append(row)
        return rows

    def _probe(self, host: Host) -> dict[str, Any]:
        import redis

        if host.role == "etcd":
            return {"health": "ok" if http_ok(f"http://{host.address}:2379/health") else "bad"}
        if host.role == "postgres":
            state = httpx.get(f"http://{host.address}:8008/patroni", timeout=1).json()
            lag = ""
            if state.get("role") == "replica":
                cluster = httpx.get(f"http://{host.address}:8008/cluster", timeout=1).json()
                me: dict[str, Any] = next(
                    (m for m in cluster["members"] if m["name"] == host.name), {}
                )
                lag = f"{me.get('lag', '?')} B"
            sync = state.get("replication") and any(
                r.get("sync_state") == "sync" for r in state["replication"]
            )
            role = str(state.get("role", "?")) + (" (sync)" if sync else "")
            return {"role": f"postgres {role}", "health": state.get("state", "?"), "lag": lag}
        if host.role == "redis":
            info = redis.Redis(host=host.address, socket_timeout=1).info("replication")
            lag = ""
            if info["role"] == "slave":
                lag = f"link {info.get('master_link_status')}"
            return {"role": f"redis {info['role']}", "health": "ok", "lag": lag}
        if host.role == "sentinel":
            return {"health": "ok", "lag": f"primary {sentinel_primary(host)}"}
        if host.role == "api":
            ok = http_ok(f"http://{host.address}:8000/readyz")
            return {"health": "ready" if ok else "not ready"}
        if host.role == "nginx":
            ok = http_ok(f"http://{host.address}/readyz")
            return {"health": "ok" if ok else "no upstream ready"}
        if host.role == "haproxy":
            csv = httpx.get(f"http://{host.address}:7000/;csv", timeout=1).text
            up = [
                f"{parts[0]}/{parts[1]}"
                for parts in (line.split(",") for line in csv.splitlines())
                if len(parts) > 17 and parts[17] == "UP" and parts[1] not in {"FRONTEND", "BACKEND"}
            ]
            return {"health": "ok", "lag": " ".join(up)}
        return {"health": "running"}


def load_config(root: Path) -> ClusterConfig:
    saved = root / "config.json"
    options = json.loads(saved.read_text()) if saved.exists() else {}
    return ClusterConfig(root=root, **options)
