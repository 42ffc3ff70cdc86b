"""`surge bench notifications`: e-mails per second through the outbox (row written in a
business transaction → job → SMTP) against a plain aiosmtplib loop, same relay, one run.

One embedded PostgreSQL (durable: fsync on, like production) and one local aiosmtpd relay
(``python -m surge.sim.smtp``, its own process, nothing stored on disk). Each repetition
measures both, in alternating order (ours first, then theirs, then theirs first...):

- **surge**: N messages written to the outbox by ``notifications.send`` (100 per business
  transaction; not timed), then one ``surge worker`` process (concurrency C, C pooled SMTP
  connections) started; the rate between the 10 % and 90 % marks of messages ``sent``
  (start-up excluded), polled every 50 ms on the events' primary key. Each message is
  rendered from its Jinja2 templates, and its state is committed before the end of DATA
  and after the reply (ADR 0019; shared by concurrent messages, ADR 0026), so this is the
  price of durability and exactly-once.
- **aiosmtplib**: the same N messages (rendered from the same templates and built by the
  same function, so only the outbox differs), sent by C concurrent loops in this process,
  each on one persistent ``aiosmtplib.SMTP`` connection (``sendmail``) — the most a sender
  can get from this relay.

CPU per message is reported beside the rates (where the time goes): the sender (the worker
process / the plain loop's process), the relay process, and the whole machine (so
PostgreSQL's share is the machine's minus the other two, minus the poller's little).

The ratio is the median over repetitions of ours ÷ the plain loop's, each pair measured
back to back (the medians of the two rates are shown too).

Target (issue 15): ours ≥ 0.7 × the plain loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiosmtplib

from bench.common import console, median, report
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
#: SMTP connections, the same on both sides (BENCH_CONNECTIONS: another count while iterating).
CONCURRENCY = int(os.environ.get("BENCH_CONNECTIONS") or 8)
#: Jobs in flight per worker: more than SMTP connections, so that the database steps of
#: some messages overlap the SMTP conversations of others (the connections stay 8).
WORKER_CONCURRENCY = 16
PER_TRANSACTION = 100
#: How often the outbox's side is polled for its ``sent`` count. Each 10 % / 90 % mark is late
#: by up to this, uniformly, so the window's error averages out; polling more often costs the
#: machine a transaction per poll (10 ms: ~100 transactions/s beside the outbox's own).
POLL = 0.05
TARGET = 0.7


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu_seconds() -> float:
    """Busy CPU time of the whole machine so far (``/proc/stat``: every state but idle and
    iowait), to see what the processes the bench does not own (PostgreSQL) spend."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _wakeups(pid: int) -> int:
    """Times a process went to sleep waiting for something (``voluntary_ctxt_switches`` of
    ``/proc/<pid>/status``): on an event loop, one per turn that found nothing ready."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


class Cpu:
    """CPU per message over a measured window: the sender, the relay, the whole machine."""

    def __init__(self) -> None:
        self.relay_pid = 0
        self.ms: dict[str, list[float]] = {}
        #: Wake-ups per message (``_wakeups``): a count, steadier than CPU time on a shared
        #: machine; each costs a trip through the kernel and the event loop.
        self.wakeups: dict[str, list[float]] = {}

    def sample(self, sender_pid: int | None = None) -> tuple[float, ...]:
        sender = _cpu_seconds(sender_pid) if sender_pid else time.process_time()
        return (
            sender, _cpu_seconds(self.relay_pid), _machine_cpu_seconds(),
            _wakeups(sender_pid or os.getpid()), _wakeups(self.relay_pid),
        )  # fmt: skip

    def record(self, engine: str, start: tuple[float, ...], end: tuple[float, ...],
               messages: float) -> None:  # fmt: skip
        for part, a, b in zip(("sender", "relay", "machine"), start, end, strict=False):
            self.ms.setdefault(f"{engine}.{part}", []).append((b - a) * 1000 / messages)
        for part, a, b in zip(("sender", "relay"), start[3:], end[3:], strict=True):
            self.wakeups.setdefault(f"{engine}.{part}", []).append((b - a) / messages)


CPU = Cpu()
DATABASE_COUNTERS = ("transactions", "rows_written", "wal_bytes")
#: PostgreSQL's work per message on the outbox's side (``Surge.database``), per repetition.
DATABASE: dict[str, list[float]] = {}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _env(database_url: str, redis_url: str, smtp_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SURGE_ENV": "development",
        "SURGE_LOG_LEVEL": "WARNING",
        "SURGE_LOG_JSON": "true",
        "SURGE_JOBS_QUEUES": "email",
        "SURGE_DB_POOL_MIN": "2",
        "SURGE_NOTIFY_SMTP_PORT": str(smtp_port),
        "SURGE_NOTIFY_SMTP_CONNECTIONS": str(CONCURRENCY),
    }


class Surge:
    name = "surge"

    def __init__(self, database_url: str, redis_url: str, smtp_port: int) -> None:
        from surge.config import Settings
        from surge.kit.runtime import Runtime

        self.env = _env(database_url, redis_url, smtp_port)
        self.settings = Settings(
            DATABASE_URL=database_url, REDIS_URL=redis_url, LOG_LEVEL="WARNING"
        )
        self.runtime = Runtime(self.settings)
        self.run = ""
        self.floor = 0
        self.seen = 0

    async def start(self) -> None:
        from surge.worker import discover

        discover(self.settings)
        await self.runtime.start()

    async def close(self) -> None:
        await self.runtime.stop()

    async def write(self, n: int) -> None:
        """The business side: N outbox rows, PER_TRANSACTION per transaction."""
        from surge.notifications.service import notifications

        self.run = uuid4().hex[:8]
        from sqlalchemy import text

        self.seen = 0
        async with self.runtime.db.session() as session:
            self.floor = int(
                await session.scalar(text("SELECT COALESCE(max(id), 0) FROM notification_events"))
                or 0
            )
        for start in range(0, n, PER_TRANSACTION):
            async with self.runtime.db.session() as session:
                for i in range(start, min(n, start + PER_TRANSACTION)):
                    to = f"reader{i}@example.com"
                    await notifications.send(
                        session, to=to, template="welcome", context={"email": to},
                        category="account", key=f"bench:{self.run}:{i}",
                    )  # fmt: skip

    async def sent(self) -> int:
        """Messages of this run recorded ``sent`` (their final event) so far. Each poll counts
        only the events written since the previous one (a range scan of the events' primary
        key past the last id seen), so polling costs PostgreSQL a few rows per poll: a
        ``count(*)`` over the run's events so far, every poll, had scanned ~n²/2 rows in all,
        charged to the outbox's side of the machine (the plain loop has no poller). An event
        committed after one with a higher id (two writers at once) would be missed: the count
        can only be low, which delays the marks — an error against the outbox, never for it."""
        from sqlalchemy import text

        async with self.runtime.db.session() as session:
            found, last = (
                await session.execute(
                    text(
                        "SELECT count(*) FILTER (WHERE event = 'sent' AND source = 'smtp'), "
                        "max(id) FROM notification_events WHERE id > :floor"
                    ),
                    {"floor": self.floor},
                )
            ).one()
        if last is not None:
            self.floor = int(last)
            self.seen += int(found or 0)
        return self.seen

    async def database(self) -> tuple[int, ...]:
        """PostgreSQL's counters so far: transactions, rows inserted + updated + deleted, WAL
        bytes (what the outbox asks of the server, per message, beside its CPU)."""
        from sqlalchemy import text

        async with self.runtime.db.session() as session:
            row = (
                await session.execute(
                    text(
                        "SELECT xact_commit + xact_rollback, "
                        "tup_inserted + tup_updated + tup_deleted, "
                        "pg_current_wal_lsn() - '0/0'::pg_lsn "
                        "FROM pg_stat_database WHERE datname = current_database()"
                    )
                )
            ).one()
        return tuple(int(v) for v in row)

    async def measure(self, n: int) -> float:
        await self.write(n)
        worker = _spawn(
            [sys.executable, "-m", "surge.worker", "--queues", "email",
             "--concurrency", str(WORKER_CONCURRENCY)],
            self.env,
        )  # fmt: skip
        assert self.run  # write() set the run and its events' floor
        marks: dict[int, float] = {}
        cpu: dict[int, tuple[float, ...]] = {}
        counters: dict[int, tuple[int, ...]] = {}
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                done = await self.sent()
                now = time.perf_counter()
                for fraction in (10, 90):
                    if fraction not in marks and done >= n * fraction / 100:
                        marks[fraction] = now
                        cpu[fraction] = CPU.sample(worker.pid)
                        counters[fraction] = await self.database()
                if 90 in marks:
                    break
                if worker.poll() is not None:
                    raise RuntimeError("the surge worker exited early")
                await asyncio.sleep(POLL)
        finally:
            _stop(worker)
        if 90 not in marks:
            raise RuntimeError("surge: did not reach 90 % in time")
        CPU.record("surge", cpu[10], cpu[90], n * 0.8)
        for name, a, b in zip(DATABASE_COUNTERS, counters[10], counters[90], strict=True):
            # The poller's own transactions (one per 50 ms) are in the count.
            DATABASE.setdefault(name, []).append((b - a) / (n * 0.8))
        return n * 0.8 / (marks[90] - marks[10])


class PlainLoop:
    name = "aiosmtplib"

    def __init__(self, smtp_port: int) -> None:
        self.port = smtp_port

    async def measure(self, n: int) -> float:
        from surge.notifications.render import build_message, render

        share = [n // CONCURRENCY + (1 if i < n % CONCURRENCY else 0) for i in range(CONCURRENCY)]

        async def loop(index: int, count: int) -> None:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False)
            await client.connect()
            try:
                for i in range(count):
                    to = f"plain{index}-{i}@example.com"
                    context = {"email": to, "public_url": "http://x", "unsubscribe_url": None}
                    rendered = render("welcome", "en", context)
                    content = build_message(
                        outbox_id=uuid4(), sender="Surge <no-reply@surge.localhost>", to=to,
                        rendered=rendered, created_at=datetime.now(UTC), category="account",
                    )  # fmt: skip
                    await client.sendmail("bounces@surge.localhost", [to], content)
            finally:
                await client.quit()

        started, cpu = time.perf_counter(), CPU.sample()
        await asyncio.gather(*(loop(i, c) for i, c in enumerate(share)))
        CPU.record("aiosmtplib", cpu, CPU.sample(), n)
        return n / (time.perf_counter() - started)


async def _run(quick: bool) -> dict[str, Any]:
    # BENCH_N / BENCH_REPS: other sizes while iterating (a --quick run of 400 is noisy).
    reps = int(os.environ.get("BENCH_REPS") or (2 if quick else 5))
    n = int(os.environ.get("BENCH_N") or (400 if quick else 3000))
    results: dict[str, list[float]] = {"surge": [], "aiosmtplib": []}
    with tempfile.TemporaryDirectory(prefix="surge-bench-notify-") as folder:
        pg = EmbeddedPostgres(Path(folder) / "pg", durable=True)
        redis = EmbeddedRedis(Path(folder) / "redis")
        database_url = pg.start()
        redis_url = redis.start()
        smtp_port = free_port()
        relay = _spawn(
            [sys.executable, "-m", "surge.sim.smtp", "--host", "127.0.0.1",
             "--port", str(smtp_port), "--store", "-"],
            dict(os.environ),
        )  # fmt: skip
        CPU.relay_pid = relay.pid
        try:
            wait_for_port("127.0.0.1", smtp_port, timeout=20)
            from surge.kit.db import migrate

            await asyncio.to_thread(migrate.upgrade, database_url)
            surge = Surge(database_url, redis_url, smtp_port)
            plain = PlainLoop(smtp_port)
            await surge.start()
            try:
                for rep in range(reps):
                    order: list[Surge | PlainLoop] = (
                        [surge, plain] if rep % 2 == 0 else [plain, surge]
                    )
                    for engine in order:
                        rate = await engine.measure(n)
                        results[engine.name].append(rate)
                        console.print(
                            f"rep {rep + 1}/{reps} {engine.name:10s} {rate:8.0f} messages/s"
                        )
            finally:
                await surge.close()
        finally:
            _stop(relay)
            redis.stop()
            pg.stop()
    return {"results": results, "messages": n, "reps": reps, "cpu_ms": CPU.ms,
            "wakeups": CPU.wakeups}  # fmt: skip


def main(quick: bool = False) -> None:
    from bench.common import run_async

    data: dict[str, Any] = {}

    async def go() -> None:
        data.update(await _run(quick))

    run_async(go)
    res = data["results"]
    ours = round(median(res["surge"]), 1)
    base = round(median(res["aiosmtplib"]), 1)
    # Each repetition measures both sides back to back: the ratio is the median of those
    # pairs, so a window where the whole machine slowed down moves both sides of one pair
    # instead of one side of the medians (the baseline moved 1 156 → 1 252/s between two
    # runs while ours held).
    pairs = [o / b if b else 0.0 for o, b in zip(res["surge"], res["aiosmtplib"], strict=True)]
    ratio = round(median(pairs), 3)
    report(
        "notifications",
        ours={"messages_per_s": ours},
        baseline={"messages_per_s": base},
        ratio=ratio,
        target=f"≥ {TARGET} × a plain aiosmtplib loop",
        ok=ratio >= TARGET,
        rows=[
            ("messages/s (median)", f"{ours:,.0f}", f"{base:,.0f}"),
            ("ratio of paired repetitions (median)", f"{ratio:.3f}", "1.000"),
            *(
                (
                    f"{part} CPU ms/message (median)",
                    f"{median(data['cpu_ms'][f'surge.{part}']):.2f}",
                    f"{median(data['cpu_ms'][f'aiosmtplib.{part}']):.2f}",
                )
                for part in ("sender", "relay", "machine")
            ),
            *(
                (
                    f"{part} wake-ups/message (median)",
                    f"{median(data['wakeups'][f'surge.{part}']):.2f}",
                    f"{median(data['wakeups'][f'aiosmtplib.{part}']):.2f}",
                )
                for part in ("sender", "relay")
            ),
        ],
        extra={
            "runs": res,
            "paired_ratios": [round(r, 3) for r in pairs],
            "messages": data["messages"],
            "reps": data["reps"],
            "cpu_ms_per_message": {
                name: round(median(values), 3) for name, values in data["cpu_ms"].items()
            },
            "cpu_ms_runs": data["cpu_ms"],
            "database_per_message": {
                name: round(median(values), 2) for name, values in DATABASE.items()
            },
            "wakeups_per_message": {
                name: round(median(values), 2) for name, values in data["wakeups"].items()
            },
            "concurrency": CONCURRENCY,
            "note": "1 worker process (16 jobs in flight, 8 SMTP connections) vs 8 plain loops "
            "on 8 connections in one process; same relay process. CPU per message between the "
            "10 % and 90 % marks (surge) or over the whole run (plain): sender = the worker / "
            "this process, relay = the relay process, machine = every busy core (PostgreSQL, "
            "the poller and anything else running included)",
        },
        title="surge bench notifications: outbox → job → SMTP vs plain aiosmtplib",
    )


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
