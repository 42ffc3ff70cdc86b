"""What one ledger transfer costs, counted rather than timed (ADR 0063): the statements the
server receives for one unit-of-work transfer and one withdrawal request, and the CPU per
transfer of the client and of the server for each shape of ``bench/ledger.py``, beside
pgbench's TPC-B and a bare asyncpg client sending the same function call.

    python -m bench._ledger_cost [seconds per run] [repetitions]

Not part of ``surge bench all`` and writes no result file: a diagnostic. CPU comes from
``os.times()`` (this process, user and kernel apart; pgbench's client counts once it has
exited) and ``/proc/<pid>/stat`` (the postmaster, its backends, and the backends already
reaped by it) — robust to a loaded machine where transfers/s are not. The bare shapes send
``BEGIN; SELECT … FROM wallet_transfer(…)`` and ``COMMIT`` as two simple queries (the two
round trips of a unit of work) or the three in one (COMMIT riding with the call): the same
server work with the least client code, so their hot / random ratio is the ceiling of the
row lock held until COMMIT, whatever the client.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg  # type: ignore[import-untyped]

from bench.common import console, run_async
from bench.ledger import CLIENTS, FUNDING, SCALE, _pgbench, _run_ledger, _setup
from surge.config import Settings
from surge.kit.db import Database, PoolConfig, migrate
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis
from surge.kit.runtime import Runtime
from surge.wallet.ledger import ledger
from surge.wallet.service import wallet as wallet_service

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def server_cpu(postmaster: int) -> float:
    """CPU seconds of the postmaster, its live children and the children it reaped."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(entry)
        if fields is None:
            continue
        if int(entry) == postmaster:
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        elif int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def client_cpu() -> tuple[float, float]:
    """(user, kernel) CPU seconds of this process and its reaped children (pgbench)."""
    t = os.times()
    return t.user + t.children_user, t.system + t.children_system


async def _trace(pg: EmbeddedPostgres, db: Database, runtime: Runtime, wallets: list[int]) -> None:
    admin = await asyncpg.connect(pg.dsn)
    try:
        await admin.execute("ALTER SYSTEM SET log_statement = 'all'")
        await admin.execute("SELECT pg_reload_conf()")
        await asyncio.sleep(0.5)
        logfile = pg.data_dir / "postgres.log"
        for label in ("unit-of-work transfer", "withdrawal request"):
            start = logfile.stat().st_size
            if label.startswith("unit"):
                async with db.session() as session:
                    await ledger.transfer(
                        session, key=f"cost:{uuid4()}", debit=wallets[1], credit=wallets[2],
                        amount=1, currency="USD", kind="transfer",
                    )  # fmt: skip
            else:
                owner = uuid4()
                async with runtime.db.session() as session:
                    wallet = await ledger.open_wallet(session, owner, currency="USD")
                    await ledger.transfer(
                        session, key=f"cost:fund:{owner}", debit=wallets[3], credit=wallet,
                        amount=FUNDING // 10, currency="USD", kind="adjustment",
                    )  # fmt: skip
                await asyncio.sleep(0.3)
                start = logfile.stat().st_size
                async with runtime.db.session() as session:
                    await wallet_service.request_withdrawal(
                        session, runtime, owner, amount=5_000, key=f"cost:{uuid4()}"
                    )
                    await session.commit()
            await asyncio.sleep(0.3)
            lines = [
                line.split("LOG:", 1)[1].strip()
                for line in logfile.read_bytes()[start:].decode(errors="replace").splitlines()
                if "LOG:" in line and ("statement:" in line or "execute" in line)
            ]
            console.print(f"[bold]{label}[/]: {len(lines)} statements")
            for line in lines:
                console.print(f"    {line[:150]}", soft_wrap=True)
    finally:
        await admin.execute("ALTER SYSTEM RESET log_statement")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.close()


async def _bare(
    connections: list[Any], wallets: list[int], *, hot: bool, one: bool, seconds: float
) -> float:
    """The function call from bare asyncpg connections, COMMIT apart or riding along."""
    deadline = time.perf_counter() + seconds
    done = 0
    run = uuid4().hex[:8]

    async def worker(index: int, connection: Any) -> None:
        nonlocal done
        rng = random.Random(3_000 + index)
        sequence = 0
        while time.perf_counter() < deadline:
            debit, credit = rng.sample(wallets, 2)
            if hot:
                credit = wallets[0]
                if debit == credit:
                    continue
            sequence += 1
            call = (
                f"SELECT * FROM wallet_transfer('x:{run}:{index}:{sequence}', {int(debit)}, "
                f"{int(credit)}, {rng.randint(1, 10_000)}, 'USD', 'transfer', NULL, false)"
            )
            if one:
                await connection.execute(f"BEGIN; {call}; COMMIT")
            else:
                await connection.execute(f"BEGIN; {call}")
                await connection.execute("COMMIT")
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i, c) for i, c in enumerate(connections)))
    return done / (time.perf_counter() - started)


async def _main(seconds: float, repetitions: int) -> None:
    with tempfile.TemporaryDirectory(prefix="surge-ledger-cost-") as folder:
        pg = EmbeddedPostgres(Path(folder) / "pg", durable=True)
        redis = EmbeddedRedis(Path(folder) / "redis")
        pg.start()
        redis_url = redis.start()
        try:
            await asyncio.to_thread(migrate.upgrade, pg.url)
            await asyncio.to_thread(
                subprocess.run,
                [pg.pgbin("pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                 "-i", "-q", "-s", str(SCALE), pg.database],
                check=True, capture_output=True,
            )  # fmt: skip
            db = Database(
                pg.url, config=PoolConfig(max_size=CLIENTS + 4, min_size=CLIENTS, slow_query=60)
            )
            runtime = Runtime(
                Settings(
                    DATABASE_URL=pg.url, REDIS_URL=redis_url, LOG_LEVEL="WARNING",
                    DB_POOL_MAX=4, DB_POOL_MIN=1, DB_SLOW_QUERY=timedelta(seconds=60),
                    WALLET_WITHDRAWAL_DAILY_MAX=FUNDING,
                )
            )  # fmt: skip
            await db.start()
            await runtime.start()
            bare: list[Any] = [await asyncpg.connect(pg.dsn) for _ in range(CLIENTS)]
            try:
                wallets, _revenue, _owners = await _setup(db)
                await _run_ledger(db, wallets, hot=False, standalone=False, seconds=1.0)
                await _trace(pg, db, runtime, wallets)
                postmaster = pg.pid()
                assert postmaster is not None
                shapes = ["pgbench", "random", "hot", "bare2", "bare2-hot", "bare1", "bare1-hot"]
                for rep in range(repetitions):
                    for shape in shapes:
                        (u0, k0), s0, t0 = client_cpu(), server_cpu(postmaster), time.perf_counter()
                        hot = shape.endswith("hot")
                        if shape == "pgbench":
                            rate = await asyncio.to_thread(_pgbench, pg, seconds)
                        elif shape.startswith("bare"):
                            rate = await _bare(
                                bare,
                                wallets,
                                hot=hot,
                                one=shape.startswith("bare1"),
                                seconds=seconds,
                            )
                        else:
                            rate = await _run_ledger(
                                db, wallets, hot=hot, standalone=False, seconds=seconds
                            )
                        (u1, k1), s1 = client_cpu(), server_cpu(postmaster)
                        n = rate * (time.perf_counter() - t0)
                        console.print(
                            f"rep {rep + 1} {shape:10s} {rate:7,.0f}/s   client "
                            f"{1e6 * (u1 - u0 + k1 - k0) / n:4.0f} µs/transfer "
                            f"(user {1e6 * (u1 - u0) / n:4.0f}, kernel {1e6 * (k1 - k0) / n:3.0f})   "
                            f"server {1e6 * (s1 - s0) / n:5.0f} µs/transfer   "
                            f"load {os.getloadavg()[0]:.1f}",
                            soft_wrap=True,
                        )
                async with db.session() as session:
                    problems = await ledger.check_invariants(session)
                console.print("invariants:", "hold" if not problems else problems[:5])
            finally:
                for connection in bare:
                    await connection.close()
                await runtime.stop()
                await db.close()
        finally:
            redis.stop()
            pg.stop()


def main(seconds: float = 3.0, repetitions: int = 2) -> None:
    run_async(lambda: _main(seconds, repetitions))


if __name__ == "__main__":
    main(
        float(sys.argv[1]) if len(sys.argv) > 1 else 3.0,
        int(sys.argv[2]) if len(sys.argv) > 2 else 2,
    )
