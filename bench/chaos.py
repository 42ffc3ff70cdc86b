"""``make chaos`` / ``surge bench chaos``: every fault injected under open-loop load, one at a
time with recovery in between, and after each the checks of issue 20 (ADR 0021).

The stack is the one ``surge up`` runs, built here so that the network can be broken too:
an embedded PostgreSQL (durable: fsync and synchronous commit on, as in production) and
Redis, a fault proxy (``surge.sim.faultproxy``) in front of each, the payment provider
simulator (``surge.sim.payments``), two API processes and a job worker fleet talking to the
servers through the proxies. The same ``kit.supervise.Supervisor``
that ``surge up`` uses restarts whatever dies (servers, API, worker fleet).

Load (``bench/_chaos_load.py``): privilege reads, wallet reads, withdrawals and card
top-ups with an ``Idempotency-Key``, on a Poisson schedule (open loop), from partners and
users on free and paid plans; revenue events recorded every two seconds, each crediting every partner through
the earnings jobs (small batches, so a killed worker leaves a batch half done).

The checks after each fault, from the acknowledged history (Jepsen's way):

- ``no_500``: no answer 5xx other than 503; every 503 carries ``Retry-After``; no 429 (the
  limits are set far above the load: a 429 would be an outage passed off as the caller's
  fault);
- ``acked_writes``: every withdrawal and top-up answered 201 is recorded, every top-up
  answered ``succeeded`` is credited exactly its amount, none is credited more;
- ``invariants``: ``Ledger.check_invariants`` (ARCHITECTURE §6) finds nothing;
- ``jobs_once``: every acknowledged revenue event credited every partner exactly once;
- ``paid_not_free``: no privilege read of a paying user answered 200 with the free plan;
- ``recovered``: ``/api/health`` back to 200 and the traffic after it ≥ 98 % 2xx.

Output: a rich table, ``bench/results/chaos.json`` (one row per fault: ``fault``, ``ok``,
figures; the JSON is also the last stdout line), ``bench/results/chaos.html`` with an
inline-SVG plot per fault (p99 latency and non-2xx answers per second, fault window shaded),
and each plot as ``bench/results/chaos-<fault>.svg``.

``python -m bench.chaos`` runs them all (about 10 minutes); ``--faults pg-kill,spike`` some;
``--quick`` shorter windows. The short version in ``make test`` is ``tests/test_chaos_run.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from bench._chaos_load import TOPUP, Caller, OpenLoad, Sent
from bench.common import RESULTS, machine, percentile
from surge.config import Settings
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port
from surge.kit.supervise import ChildProcess, Component, Supervisor
from surge.sim.faultproxy import FaultProxy, ProxyThread

console = Console(stderr=True)
ROOT = Path(__file__).resolve().parents[1]
SECRET = "chaos-secret-chaos-secret-chaos-secret-01"
PASSWORD = "chaos-password-1"
WEBHOOK_SECRET = "whsec_chaos_0123456789abcdef"
PARTNERS = 12
USERS = 12
PAID = ("pro", "plus")
#: Limits far above the load: any 429 means an outage was answered as the caller's fault.
POLICIES = [
    {"name": "chaos-subject", "limit": 600_000, "period": "PT1M", "per": "subject"},
    {"name": "chaos-ip", "limit": 6_000_000, "period": "PT1M", "per": "ip"},
]


# ---- the stack ------------------------------------------------------------------------------
@dataclass
class Stack:
    folder: Path
    quick: bool
    pg: EmbeddedPostgres = field(init=False)
    redis: EmbeddedRedis = field(init=False)
    proxies: ProxyThread = field(init=False)
    pg_proxy: FaultProxy = field(init=False)
    redis_proxy: FaultProxy = field(init=False)
    api: ChildProcess = field(init=False)
    worker: ChildProcess = field(init=False)
    payments: ChildProcess = field(init=False)
    payments_port: int = field(default_factory=free_port)
    supervisor: Supervisor = field(init=False)
    port: int = field(default_factory=free_port)
    tick_lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ticker: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def direct_settings(self) -> Settings:
        return Settings(
            DATABASE_URL=self.pg.url, REDIS_URL=self.redis.url, ENV="test", SECRET_KEY=SECRET,
            LOG_LEVEL="WARNING", LOG_JSON=True, AUTH_ARGON2_TIME_COST=1,
            AUTH_ARGON2_MEMORY_KIB=1024, AUTH_ARGON2_PARALLELISM=1, DB_CONNECT_TIMEOUT=2,
        )  # fmt: skip

    def start(self) -> None:
        from surge.kit.db import migrate

        self.pg = EmbeddedPostgres(self.folder / "postgres", durable=True)
        self.pg.start()
        self.redis = EmbeddedRedis(self.folder / "redis")
        self.redis.start()
        migrate.upgrade(self.pg.url)
        self.proxies = ProxyThread()
        self.pg_proxy = self.proxies.add("127.0.0.1", self.pg.port)
        self.redis_proxy = self.proxies.add("127.0.0.1", self.redis.port)
        metrics = self.folder / "metrics"
        metrics.mkdir(exist_ok=True)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SURGE_")},
            "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{self.pg_proxy.port}/surge",
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_proxy.port}/0",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            "SURGE_ENV": "test",
            "SURGE_SECRET_KEY": SECRET,
            "SURGE_LOG_JSON": "true",
            "SURGE_LOG_LEVEL": "WARNING",
            "SURGE_DB_CONNECT_TIMEOUT": "PT2S",
            "SURGE_DB_POOL_TIMEOUT": "PT2S",
            "SURGE_DB_STATEMENT_TIMEOUT": "PT5S",
            "SURGE_REQUEST_TIMEOUT": "PT8S",
            "SURGE_RATELIMIT_POLICIES": json.dumps(POLICIES),
            "SURGE_AUTH_ARGON2_TIME_COST": "1",
            "SURGE_AUTH_ARGON2_MEMORY_KIB": "1024",
            "SURGE_AUTH_ARGON2_PARALLELISM": "1",
            "SURGE_JOBS_LEASE": "PT5S",
            "SURGE_JOBS_STALLED_CHECK": "PT1S",
            "SURGE_JOBS_POLL_INTERVAL": "PT0.2S",
            "SURGE_JOBS_BACKOFF": "PT0.5S",
            "SURGE_JOBS_BACKOFF_MAX": "PT5S",
            "SURGE_WALLET_EARNINGS_BATCH": "4",  # three batches per event: kills land mid-way
            # Thousands of 10.00 withdrawals per partner in one run measure the money path,
            # not the 24 h payout cap (ADR 0051), which would turn the tail into 409s.
            "SURGE_WALLET_WITHDRAWAL_DAILY_MAX": str(10**15),
            "SURGE_PAYMENTS_PROVIDER_URL": f"http://127.0.0.1:{self.payments_port}",
            "SURGE_PAYMENTS_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "SURGE_PAYMENTS_TIMEOUT": "PT4S",
        }
        python = sys.executable
        self.payments = _LoggedChild(
            "payments-sim",
            [python, "-m", "surge.sim.payments", "--host", "127.0.0.1", "--port",
             str(self.payments_port), "--webhook-url",
             f"{self.base_url}/api/v1/webhooks/payments", "--webhook-secret", WEBHOOK_SECRET],
            env, (self.folder / "payments-sim.log").open("ab"),
        )  # fmt: skip
        self.payments.start()
        wait_for_port("127.0.0.1", self.payments_port, timeout=30)
        api_log = (self.folder / "api.log").open("ab")
        worker_log = (self.folder / "worker.log").open("ab")
        self.api = _LoggedChild(
            "api",
            [python, "-m", "surge.cli", "serve", "--workers", "2", "--port", str(self.port),
             "--no-servers"],
            env, api_log,
        )  # fmt: skip
        self.worker = _LoggedChild(
            "worker",
            [python, "-m", "surge.cli", "worker", "--processes", "1", "--no-servers"],
            env, worker_log,
        )  # fmt: skip
        self.api.start()
        self.worker.start()

        def start_pg() -> None:
            self.pg.start()

        def start_redis() -> None:
            self.redis.start()

        self.supervisor = Supervisor(
            [
                Component("postgres", self.pg.running, start_pg),
                Component("redis", self.redis.running, start_redis),
                self.api.component(),
                self.worker.component(),
                self.payments.component(),
            ]
        )
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()
        _wait(lambda: _health(self.base_url) == 200, 90, "the API to answer")

    def _tick(self) -> None:
        while not self._stop.is_set():
            with self.tick_lock:
                self.supervisor.tick()
            time.sleep(0.2)

    def component(self, name: str) -> Component:
        return next(c for c in self.supervisor.components if c.name == name)

    @contextlib.contextmanager
    def unsupervised(self, *names: str) -> Iterator[None]:
        """A planned outage: the supervisor leaves these alone until the block ends."""
        with self.tick_lock:
            for name in names:
                self.component(name).paused = True
        try:
            yield
        finally:
            with self.tick_lock:
                for name in names:
                    self.component(name).paused = False

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=10)
        for child in (self.api, self.worker, self.payments):
            if child.process is not None and child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGTERM)
                try:
                    child.process.wait(timeout=20)
                except Exception:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.process.pid, signal.SIGKILL)
        self.proxies.close()
        self.redis.stop()
        self.pg.stop("fast")


class _LoggedChild(ChildProcess):
    """A ``ChildProcess`` whose output goes to a log file of the run."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Any) -> None:
        super().__init__(name, command, env)
        self.log = log

    def start(self) -> None:
        import subprocess

        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = subprocess.Popen(
            self.command, env=self.env, start_new_session=True, cwd=ROOT,
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _health(base: str) -> int:
    try:
        return httpx.get(f"{base}/api/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _wait(predicate: Callable[[], bool], within: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what}: not within {within:.0f}s")
        time.sleep(0.1)
    return time.monotonic() - started


# ---- the world the checker knows -------------------------------------------------------------
@dataclass
class World:
    stack: Stack
    runtime: Any = None
    callers: list[Caller] = field(default_factory=list)
    partners: list[uuid.UUID] = field(default_factory=list)
    acked_events: list[str] = field(default_factory=list)
    _pending_event: str | None = None
    _events: int = 0
    _event_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def seed(self) -> None:
        from surge.identity.service import identity as identity_service
        from surge.kit.runtime import Runtime
        from surge.wallet.accounts import SystemAccount
        from surge.wallet.ledger import ledger
        from surge.wallet.service import wallet as wallet_service
        from surge.worker import discover

        settings = self.stack.direct_settings()
        discover(settings)
        from surge.identity.runtime import install_identity

        self.runtime = Runtime(settings)
        identity = install_identity(self.runtime)
        await self.runtime.start()
        await identity.start()
        rt = self.runtime
        run = uuid.uuid4().hex[:8]
        for index in range(PARTNERS + USERS):
            partner = index < PARTNERS
            plan = PAID[index % 2] if index % 4 < 2 else "free"
            email = f"chaos-{run}-{index}@example.com"
            async with rt.db.session() as session:
                user = await identity_service.register(
                    session, rt, email=email, password=PASSWORD,
                    role="partner" if partner else "user",
                )  # fmt: skip
                if plan != "free":
                    await identity_service.change_plan(
                        session, rt, None, user_id=user.id, plan=plan, expires_at=None
                    )
                if partner:
                    await wallet_service.set_partner(session, rt, user.id, share_bps=4_000)
                    currency = settings.WALLET_CURRENCY
                    external = await ledger.system_account(
                        session, SystemAccount.external, currency=currency
                    )
                    wallet = await ledger.open_wallet(session, user.id, currency=currency)
                    await ledger.transfer(
                        session, key=f"chaos-fund:{user.id}", debit=external, credit=wallet,
                        amount=10**11, currency=currency, kind="adjustment",
                    )  # fmt: skip
                    self.partners.append(user.id)
            async with rt.db.session() as session:
                tokens = await identity_service.login(session, rt, email=email, password=PASSWORD)
            self.callers.append(Caller(str(user.id), tokens.access_token, plan, partner))

    async def revenue_event(self) -> bool:
        """Record the next revenue event (the same id again until one is acknowledged).
        One at a time: the periodic task and a fault's burst share the pending id."""
        from surge.wallet.service import wallet as wallet_service

        async with self._event_lock:
            if self._pending_event is None:
                self._events += 1
                self._pending_event = f"chaos-{uuid.uuid4().hex[:8]}-{self._events}"
            event_id = self._pending_event
            try:
                async with asyncio.timeout(5), self.runtime.db.session() as session:
                    await wallet_service.record_revenue_event(
                        session, self.runtime, event_id=event_id, kind="sale", profit=100_000
                    )
            except Exception:
                return False
            self.acked_events.append(event_id)
            self._pending_event = None
            return True

    async def events_forever(self) -> None:
        while True:
            await self.revenue_event()
            await asyncio.sleep(2)

    async def query(self, sql: str, **params: Any) -> list[Any]:
        """A read on the primary, retried while the database comes back."""
        deadline = time.monotonic() + 60
        while True:
            try:
                async with asyncio.timeout(10):
                    async with self.runtime.db.session() as session:
                        return list((await session.execute(text(sql), params)).all())
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def invariants(self) -> list[str]:
        from surge.wallet.ledger import ledger

        deadline = time.monotonic() + 60
        while True:
            try:
                async with asyncio.timeout(20):
                    async with self.runtime.db.session() as session:
                        await session.execute(
                            text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        )
                        return await ledger.check_invariants(session)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def acked_missing(self, records: list[Sent]) -> list[str]:
        acked = [r.acked_id for r in records if r.kind == "withdraw" and r.status == 201]
        if not acked:
            return []
        found = await self.query(
            "SELECT id::text FROM wallet_withdrawals WHERE id = ANY(CAST(:ids AS uuid[]))",
            ids=acked,
        )
        present = {row[0] for row in found}
        return [i for i in acked if i not in present]

    async def topups_wrong(self, records: list[Sent], within: float) -> list[str]:
        """Top-ups answered 201 are recorded; those answered ``succeeded`` are credited
        exactly their amount (by the request, the webhook or reconciliation: once); no
        top-up anywhere is credited more than its amount."""
        acked = {r.acked_id: r.served for r in records if r.kind == "topup" and r.status == 201}
        deadline = time.monotonic() + within
        while True:
            rows = await self.query(
                "SELECT id::text, amount, amount_credited FROM payment_topups "
                "WHERE id = ANY(CAST(:ids AS uuid[])) OR amount_credited > amount",
                ids=list(acked),
            )
            found = {row[0]: (int(row[1]), int(row[2])) for row in rows}
            wrong = [f"over-credited {i}" for i, (a, c) in found.items() if c > a]
            wrong += [f"missing {i}" for i in acked if i not in found]
            short = [
                f"succeeded, credited {found[i][1]} of {TOPUP}: {i}"
                for i, status in acked.items()
                if status == "succeeded" and i in found and found[i][1] != TOPUP
            ]
            if wrong or not short or time.monotonic() > deadline:
                return wrong + short
            await asyncio.sleep(0.5)

    async def jobs_once(self, within: float) -> tuple[bool, str]:
        """Every acknowledged event credited every partner once (waits for the queue)."""
        deadline = time.monotonic() + within
        expected = len(self.partners)
        while True:
            rows = await self.query(
                "SELECT event_id, count(*), count(DISTINCT owner_id) FROM wallet_earnings "
                "WHERE event_id = ANY(:ids) GROUP BY event_id",
                ids=list(self.acked_events),
            )
            counts = {row[0]: (int(row[1]), int(row[2])) for row in rows}
            doubled = [e for e, (n, d) in counts.items() if n != d or n > expected]
            if doubled:
                return False, f"{len(doubled)} event(s) credited twice"
            short = [e for e in self.acked_events if counts.get(e, (0, 0))[0] < expected]
            if not short:
                return True, f"{len(self.acked_events)} events × {expected} partners"
            if time.monotonic() > deadline:
                return False, f"{len(short)} event(s) not fully credited after {within:.0f}s"
            await asyncio.sleep(0.5)


# ---- faults ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    run: Callable[[Stack, World, OpenLoad, float], Awaitable[str]]
    """Injects the fault and returns once it has been lifted (``scale`` shortens waits)."""
    settle: float = 0.0
    """Seconds the system may take, by design, after the fault is lifted before "after" is
    judged: a circuit breaker stays open ``BREAKER_OPEN_DURATION`` (30 s) before it probes."""


def _kill(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _children(proc: ChildProcess, needle: str) -> list[psutil.Process]:
    if proc.pid is None:
        return []
    try:
        found = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in found:
        with contextlib.suppress(psutil.Error):
            if needle in " ".join(child.cmdline()):
                out.append(child)
    return out


async def web_kill(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    workers = _children(stack.api, "spawn_main")  # uvicorn's workers, not its resource tracker
    victim = workers[0] if workers else None
    _kill(victim.pid if victim else stack.api.pid)
    return f"SIGKILL web process {victim.pid if victim else stack.api.pid}"


async def worker_kill(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    for _ in range(4):  # a few events queued, their earnings batches in flight
        await world.revenue_event()
    await asyncio.sleep(0.4)
    victims = _children(stack.worker, "surge.worker")
    for victim in victims:
        _kill(victim.pid)
    return f"SIGKILL {len(victims)} worker process(es) mid-earnings"


async def pg_kill(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    _kill(stack.pg.pid())
    return "SIGKILL postmaster; the supervisor restarts it (crash recovery)"


async def redis_kill(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    _kill(stack.redis.pid())
    return "SIGKILL redis-server; the supervisor restarts it (empty)"


async def redis_stop(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    seconds = 30 * scale
    with stack.unsupervised("redis"):
        await asyncio.to_thread(stack.redis.stop)
        await asyncio.sleep(seconds)
        await asyncio.to_thread(stack.redis.start)
    return f"Redis stopped {seconds:.0f}s"


async def redis_freeze(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    seconds = 15 * scale
    pid = stack.redis.pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
    return f"Redis frozen (SIGSTOP) {seconds:.0f}s"


async def pg_immediate(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    with stack.unsupervised("postgres"):
        await asyncio.to_thread(stack.pg.stop, "immediate")
        await asyncio.to_thread(stack.pg.start)
    return "pg_ctl stop -m immediate, then start (crash recovery)"


async def pg_blackhole(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    seconds = 20 * scale
    proxy = stack.pg_proxy
    stack.proxies.call(proxy.blackhole())
    await asyncio.sleep(seconds)
    stack.proxies.call(proxy.heal())
    return f"PostgreSQL unreachable (blackhole) {seconds:.0f}s"


async def both_down(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    seconds = 15 * scale
    with stack.unsupervised("postgres", "redis"):
        await asyncio.gather(
            asyncio.to_thread(stack.pg.stop, "immediate"), asyncio.to_thread(stack.redis.stop)
        )
        await asyncio.sleep(seconds)
        await asyncio.gather(
            asyncio.to_thread(stack.pg.start), asyncio.to_thread(stack.redis.start)
        )
    return f"Redis and PostgreSQL down together {seconds:.0f}s"


async def latency(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    seconds = 20 * scale
    for proxy in (stack.pg_proxy, stack.redis_proxy):
        stack.proxies.call(proxy.latency(0.05))
    await asyncio.sleep(seconds)
    for proxy in (stack.pg_proxy, stack.redis_proxy):
        stack.proxies.call(proxy.heal())
    return f"+50 ms each way to Redis and PostgreSQL, {seconds:.0f}s"


async def resets(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    seconds = 15 * scale
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        for proxy in (stack.pg_proxy, stack.redis_proxy):
            stack.proxies.call(proxy.reset())
        count += 1
        await asyncio.sleep(1.0)
    return f"every connection to Redis and PostgreSQL reset, {count}× over {seconds:.0f}s"


def _provider(stack: Stack, **changes: object) -> None:
    """Change the payment provider simulator's faults (its ``/_sim/control``)."""
    url = f"http://127.0.0.1:{stack.payments_port}/_sim/control"
    httpx.post(url, json=changes, timeout=5).raise_for_status()


async def payments_slow(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    seconds = 20 * scale
    await asyncio.to_thread(_provider, stack, latency=3.0)
    await asyncio.sleep(seconds)
    await asyncio.to_thread(_provider, stack, latency=0.0)
    return f"payment provider answering in 3 s, {seconds:.0f}s"


async def payments_down(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    seconds = 20 * scale
    await asyncio.to_thread(_provider, stack, down=True)
    await asyncio.sleep(seconds)
    await asyncio.to_thread(_provider, stack, down=False)
    return f"payment provider answering 503 to everything, {seconds:.0f}s"


async def spike(stack: Stack, world: World, load: OpenLoad, scale: float) -> str:
    seconds = 30 * scale
    base = load.rate
    load.rate = lambda t: base(t) * 10
    await asyncio.sleep(seconds)
    load.rate = base
    return f"10× arrival rate for {seconds:.0f}s"


FAULTS = [
    Fault("web-kill", "kill -9 a web process", web_kill),
    Fault("worker-kill", "kill -9 the job worker mid earnings batch", worker_kill),
    Fault("pg-kill", "kill -9 embedded PostgreSQL", pg_kill),
    Fault("redis-kill", "kill -9 embedded Redis", redis_kill),
    Fault("redis-stop", "Redis stopped 30 s", redis_stop),
    Fault("redis-freeze", "Redis frozen (SIGSTOP) 15 s", redis_freeze),
    Fault("pg-immediate", "PostgreSQL restarted with -m immediate", pg_immediate),
    Fault("pg-blackhole", "PostgreSQL unreachable 20 s (fault proxy)", pg_blackhole),
    Fault("both-down", "Redis and PostgreSQL down together", both_down),
    Fault("latency", "latency +50 ms via the fault proxy", latency),
    Fault("resets", "connection resets via the fault proxy", resets),
    Fault("payments-slow", "payment provider simulator slow (3 s) 20 s", payments_slow),
    Fault(
        "payments-down",
        "payment provider simulator failing (503) 20 s",
        payments_down,
        settle=30.0,
    ),
    Fault("spike", "10x arrival spike 30 s", spike),
]
SHORT = ["pg-kill", "redis-freeze"]


# ---- one fault, measured and checked -------------------------------------------------------------
def _p99(records: list[Sent]) -> float:
    return round(percentile([r.latency * 1000 for r in records], 99), 1)


def _codes(records: list[Sent]) -> dict[str, int]:
    counts = Counter(str(r.status) if r.status else "no-answer" for r in records)
    return dict(sorted(counts.items()))


async def run_fault(
    fault: Fault, stack: Stack, world: World, load: OpenLoad, *, pre: float, post: float,
    scale: float,
) -> dict[str, Any]:  # fmt: skip
    console.rule(f"[bold]{fault.name}[/]: {fault.what}")
    await asyncio.sleep(pre)
    start = load.now()
    note = await fault.run(stack, world, load, scale)
    end = load.now()
    try:
        healed = await asyncio.to_thread(
            _wait, lambda: _health(stack.base_url) == 200, 90, "health back to 200"
        )
    except TimeoutError:
        healed = None
    recovered_at = load.now()
    await asyncio.sleep(post + fault.settle)
    finish = load.now()
    # Every request of the window answered (or timed out) before it is judged: after a
    # spike the backlog's answers come late, and one missing would read as nothing sent.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        oldest = load.oldest_pending()
        if oldest is None or oldest >= finish:
            break
        await asyncio.sleep(0.2)
    window = [r for r in load.records if start - pre <= r.due < finish]
    before = [r for r in window if r.due < start]
    # The fault, until healthy again, and one more second (answers still in flight then).
    during = [r for r in window if start <= r.due < recovered_at + 1.0]
    after = [r for r in window if r.due >= recovered_at + 1.0 + fault.settle]

    bad = [r for r in window if r.status >= 500 and r.status != 503]
    no_retry = [r for r in window if r.status == 503 and not r.retry_after]
    throttled = [r for r in window if r.status == 429]
    missing = await world.acked_missing(load.records)
    missing += await world.topups_wrong(load.records, within=30)
    problems = await world.invariants()
    jobs_ok, jobs_note = await world.jobs_once(within=60)
    served_free = [
        r for r in window if r.kind == "read" and r.status == 200 and r.plan != "free"
        and r.served == "free"
    ]  # fmt: skip
    after_ok = sum(1 for r in after if 200 <= r.status < 300) / max(1, len(after))
    checks = {
        "no_500": not bad and not no_retry and not throttled,
        "acked_writes": not missing,
        "invariants": not problems,
        "jobs_once": jobs_ok,
        "paid_not_free": not served_free,
        "recovered": healed is not None and after_ok >= 0.98,
    }
    row: dict[str, Any] = {
        "fault": fault.name,
        "ok": all(checks.values()),
        "what": fault.what,
        "note": note,
        "checks": checks,
        "recover_s": None if healed is None else round(healed, 2),
        "fault_s": round(end - start, 2),
        "requests": len(window),
        "codes_during": _codes(during),
        "p99_ms": {"before": _p99(before), "during": _p99(during), "after": _p99(after)},
        "after_2xx": round(after_ok, 4),
        "details": {
            "5xx_not_503": len(bad),
            "503_without_retry_after": len(no_retry),
            "429": len(throttled),
            "acked_writes_missing": len(missing),
            "acked_writes_examples": missing[:3],
            "invariant_violations": problems[:5],
            "jobs": jobs_note,
            "paid_served_free": len(served_free),
            "paid_served_free_at": [
                [round(r.due - start, 2), r.plan, r.user_id[:8]] for r in served_free[:5]
            ],
            "errors": sorted({r.error for r in bad if r.error})[:3],
        },
        "plot": _series(window, start - pre, finish),
        "window": [
            round(start - pre, 2),
            round(start, 2),
            round(end, 2),
            round(finish, 2),
            round(recovered_at, 2),
        ],
    }
    status = (
        "[green]ok"
        if row["ok"]
        else "[red]FAILED " + ", ".join(k for k, v in checks.items() if not v)
    )
    console.print(f"{fault.name}: {status}[/] — recovered in {row['recover_s']}s; {note}")
    return row


def _series(records: list[Sent], t0: float, t1: float) -> list[dict[str, float]]:
    """Per second: p99 latency (ms) and answers that were not 2xx (and their kind)."""
    out = []
    for second in range(int(t1 - t0) + 1):
        lo = t0 + second
        bucket = [r for r in records if lo <= r.due < lo + 1]
        out.append(
            {
                "t": second,
                "n": len(bucket),
                "p99": _p99(bucket),
                "err": sum(1 for r in bucket if not 200 <= r.status < 300),
                "e503": sum(1 for r in bucket if r.status == 503),
            }
        )
    return out


# ---- report ---------------------------------------------------------------------------------
def svg_plot(row: dict[str, Any], width: int = 640, height: int = 200) -> str:
    """p99 latency (line, log scale) and non-2xx answers per second (bars), fault shaded."""
    import math

    series = row["plot"]
    t0, start, end, _, recovered = row["window"]
    span = max(1, len(series))
    pad_l, pad_r, pad_t, pad_b = 46, 40, 22, 24
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(t: float) -> float:
        return pad_l + w * t / span

    top_ms = max([s["p99"] for s in series] + [10.0])
    log_top = math.log10(max(top_ms, 10.0))

    def y_ms(v: float) -> float:
        return pad_t + h * (1 - math.log10(max(v, 1.0)) / log_top)

    top_err = max([s["err"] for s in series] + [1])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<rect x="{x(end - t0):.1f}" y="{pad_t}" '
        f'width="{max(0.0, x(recovered - t0) - x(end - t0)):.1f}" height="{h}" fill="#fff3c4"/>',
        f'<rect x="{x(start - t0):.1f}" y="{pad_t}" '
        f'width="{max(2.0, x(end - t0) - x(start - t0)):.1f}" height="{h}" fill="#fde2e2"/>',
        f'<text x="{pad_l}" y="14" font-weight="bold">{html.escape(row["fault"])}</text>',
        f'<text x="{width - pad_r}" y="14" text-anchor="end" fill="#555">'
        f"red: fault · yellow: until healthy · line: p99 ms (log) · bars: non-2xx/s</text>",
    ]
    for s in series:
        if s["err"]:
            bar = h * s["err"] / top_err
            colour = "#f0a030" if s["err"] == s["e503"] else "#d03030"
            parts.append(
                f'<rect x="{x(s["t"]):.1f}" y="{pad_t + h - bar:.1f}" width="{max(1.0, w / span - 1):.1f}" '
                f'height="{bar:.1f}" fill="{colour}" opacity="0.8"/>'
            )
    points = " ".join(f"{x(s['t'] + 0.5):.1f},{y_ms(s['p99']):.1f}" for s in series if s["n"])
    parts.append(f'<polyline points="{points}" fill="none" stroke="#1f5fbf" stroke-width="1.5"/>')
    for ms in (10, 100, 1000, 10000):
        if ms <= top_ms * 1.01:
            parts.append(
                f'<text x="{pad_l - 4}" y="{y_ms(ms) + 4:.1f}" text-anchor="end" fill="#1f5fbf">'
                f"{ms if ms < 1000 else f'{ms // 1000}s'}</text>"
                f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y_ms(ms):.1f}" y2="{y_ms(ms):.1f}" '
                f'stroke="#ddd"/>'
            )
    parts.append(
        f'<text x="{pad_l + w + 4}" y="{pad_t + 8}" fill="#d03030">{top_err}/s</text>'
        f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{pad_t + h}" y2="{pad_t + h}" stroke="#999"/>'
        f'<text x="{pad_l}" y="{height - 6}" fill="#555">0 s</text>'
        f'<text x="{pad_l + w}" y="{height - 6}" text-anchor="end" fill="#555">{span} s</text>'
        "</svg>"
    )
    return "".join(parts)


def write_report(
    rows: list[dict[str, Any]], meta: dict[str, Any], results: Path = RESULTS
) -> dict[str, Any]:
    table = Table(title="surge bench chaos: each fault under open-loop load")
    for column in ("fault", "ok", "recover s", "p99 before/during/after ms", "codes during",
                   "failed checks"):  # fmt: skip
        table.add_column(column)
    for row in rows:
        p99 = row["p99_ms"]
        table.add_row(
            row["fault"],
            "[green]yes" if row["ok"] else "[red]no",
            str(row["recover_s"]),
            f"{p99['before']:.0f} / {p99['during']:.0f} / {p99['after']:.0f}",
            " ".join(f"{k}:{v}" for k, v in row["codes_during"].items()),
            ", ".join(k for k, v in row["checks"].items() if not v) or "-",
        )
    console.print(table)
    results.mkdir(parents=True, exist_ok=True)
    sections = []
    for row in rows:
        svg = svg_plot(row)
        (results / f"chaos-{row['fault']}.svg").write_text(svg + "\n")
        checks = " ".join(
            f'<span class="{"ok" if v else "bad"}">{k}</span>' for k, v in row["checks"].items()
        )
        sections.append(
            f"<section><h2>{html.escape(row['fault'])} — {html.escape(row['what'])}</h2>"
            f"<p>{html.escape(row['note'])}. Recovered in {row['recover_s']} s; p99 ms "
            f"before/during/after: {row['p99_ms']['before']} / {row['p99_ms']['during']} / "
            f"{row['p99_ms']['after']}; answers during: "
            f"{html.escape(json.dumps(row['codes_during']))}</p><p>{checks}</p>{svg}</section>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>Surge chaos report</title><style>"
        "body{font-family:sans-serif;max-width:760px;margin:2em auto}"
        ".ok{color:#17752b;margin-right:1em}.bad{color:#c01818;font-weight:bold;margin-right:1em}"
        "</style><h1>Surge chaos report</h1>"
        f"<p>{html.escape(json.dumps(meta))}</p>" + "".join(sections)
    )
    (results / "chaos.html").write_text(page)
    result = {
        "bench": "chaos",
        "ok": all(r["ok"] for r in rows),
        "rows": [{k: v for k, v in r.items() if k != "plot"} for r in rows],
        **meta,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    (results / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---- the run ------------------------------------------------------------------------------
async def run(
    names: list[str], *, quick: bool, rate: float, results: Path = RESULTS
) -> dict[str, Any]:
    chosen = [f for f in FAULTS if f.name in names]
    unknown = set(names) - {f.name for f in FAULTS}
    if unknown:
        raise SystemExit(f"unknown fault(s) {sorted(unknown)}; have {[f.name for f in FAULTS]}")
    pre, post, scale = (3.0, 5.0, 1 / 3) if quick else (5.0, 10.0, 1.0)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="surge-chaos-") as tmp:
        stack = Stack(Path(tmp), quick)
        with console.status("Starting PostgreSQL, Redis, fault proxies, API and workers..."):
            await asyncio.to_thread(stack.start)
        world = World(stack)
        load: OpenLoad | None = None
        events: asyncio.Task[None] | None = None
        try:
            with console.status("Seeding partners and users..."):
                await world.seed()
            load = OpenLoad(stack.base_url, world.callers, rate=lambda t: rate)
            await load.start()
            events = asyncio.create_task(world.events_forever())
            rows = []
            for fault in chosen:
                rows.append(
                    await run_fault(fault, stack, world, load, pre=pre, post=post, scale=scale)
                )
        finally:
            if events is not None:
                events.cancel()
            if load is not None:
                await load.stop()
            if world.runtime is not None:
                await world.runtime.stop()
            await asyncio.to_thread(stack.stop)
    meta = {
        "rate_rps": rate,
        "quick": quick,
        "seconds": round(time.monotonic() - began, 1),
        "restarts": {c.name: c.restarts for c in stack.supervisor.components},
    }
    return write_report(rows, meta, results)


def main(
    quick: bool = False,
    faults: list[str] | None = None,
    rate: float = 0.0,
    results: Path = RESULTS,
) -> None:
    names = faults or (SHORT if quick else [f.name for f in FAULTS])
    rate = rate or (10.0 if quick else 20.0)
    result = asyncio.run(run(names, quick=quick, rate=rate, results=results))
    summary = {k: v for k, v in result.items() if k != "rows"} | {
        "rows": [{"fault": r["fault"], "ok": r["ok"], "recover_s": r["recover_s"],
                  "p99_ms": r["p99_ms"]} for r in result["rows"]],
    }  # fmt: skip
    sys.stdout.write(json.dumps(summary) + "\n")  # the last stdout line, as every bench
    sys.stdout.flush()
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Surge chaos run (issue 20)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--faults", default="", help="comma-separated (default: all)")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s (default 20)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where reports go")
    args = parser.parse_args()
    main(
        quick=args.quick,
        faults=[f for f in args.faults.split(",") if f],
        rate=args.rate,
        results=args.results,
    )
