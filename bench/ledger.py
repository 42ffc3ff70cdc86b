"""`surge bench ledger`: transfers/s through the wallet's ledger service versus pgbench's
TPC-B-like transaction, on the same PostgreSQL server, in the same run.

What is measured, each for ``SECONDS`` per repetition, the three interleaved (rotated order)
for several repetitions, medians reported:

- **random**: 16 asyncio tasks, each transferring between two random wallets of 1 000 through
  the ledger service, two ways: ``ledger.transfer_now`` (a standalone transfer: one
  autocommit statement, concurrent ones coalesced into one batch statement — ADR 0024; the
  headline) and ``ledger.transfer`` inside a unit of work of its own
  (``Database.session()``: BEGIN, the call, COMMIT — the path of a request or a job that
  does more than the transfer);
- **hot**: the same 16 tasks all crediting ONE wallet from random wallets (every transfer
  queues on that wallet's row lock: the worst case of a popular partner), both ways; the
  unit of work passes ``defer_contended_credit`` (ADR 0065: a credit that finds the row held
  goes pending and is posted after the commit), and a run ends when its credits are posted;
  **hot_plain** is the same unit of work with the default transfer (no caller of the
  product opts in yet: shown beside it, not a target);
- **batch50**: the same 16 tasks crediting 50 random wallets from the revenue account per
  unit of work with ``ledger.transfer_many`` (an earnings job's shape; all batches serialise
  on the revenue row's lock), counted in credits/s;
- **withdrawals**: the same 16 tasks each requesting withdrawals through the wallet's service
  (``request_withdrawal``: the wallet's row lock, the payout rules' reads, a pending transfer
  to the holds system account, the withdrawal row, COMMIT) for random owners of the 1 000,
  one unit of work each. Every request credits a holds account: this is the row ADR 0058
  stripes. Compared with the random unit-of-work transfer of the same run (the same
  shape without the payout rules: what a withdrawal could reach were holds not shared);
- **pgbench**: ``pgbench -c 16 -j 2`` with its built-in tpcb-like script (5 statements: three
  balance updates, a select, a history insert) at scale 16 (one branch row per client, as
  TPC-B asks), simple protocol — the physical limit of a balance-moving transaction on this
  server, driven by a C client. ``-M prepared`` is reported as well, for reference.

The client runs on uvloop, the event loop of the API and the worker processes. The server is an embedded PostgreSQL started for this run (durable: fsync on, as production);
the Python side and pgbench share the machine's 2 cores with the server, so figures are
"server + client" throughput. After the runs the ledger's invariant checker must find nothing.

Targets (issue 17): standalone random-wallet transfers/s ≥ 1.0 × pgbench tpcb-like (simple)
in the same window, the unit-of-work figure ≥ 0.8 ×, and a hot wallet ≥ 0.5 × the
random-wallet figure of the same path; ``ok`` only when all hold and the invariants too.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from uuid import UUID, uuid4

from sqlalchemy import text

from bench.common import console, median, report, run_async
from surge.config import Settings
from surge.kit.db import Database, PoolConfig, migrate
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis
from surge.kit.runtime import Runtime
from surge.wallet.accounts import SystemAccount
from surge.wallet.ledger import TransferSpec, ledger
from surge.wallet.service import wallet as wallet_service

CLIENTS = 16
WALLETS = 1_000
SCALE = 16
FUNDING = 10**12  # per wallet: no transfer in the run can be refused for funds
TARGET = 1.0
UNIT_OF_WORK_TARGET = 0.8
HOT_TARGET = 0.5
ROWS = ("random_now", "random", "hot_now", "hot", "hot_plain", "batch50", "withdrawals")


async def _setup(db: Database) -> tuple[list[int], int, dict[int, UUID]]:
    async with db.session() as session:
        external = await ledger.system_account(session, SystemAccount.external, currency="USD")
        revenue = await ledger.system_account(session, SystemAccount.revenue, currency="USD")
        await session.execute(
            text(
                "INSERT INTO wallet_accounts (owner_id, code, currency) "
                "SELECT gen_random_uuid(), 'wallet', 'USD' FROM generate_series(1, :n)"
            ),
            {"n": WALLETS},
        )
        ids = list(
            (
                await session.execute(
                    text("SELECT id FROM wallet_accounts WHERE code = 'wallet' ORDER BY id")
                )
            ).scalars()
        )
    async with db.session() as session:  # funded through the ledger, like everything else
        for account in ids:
            await ledger.transfer(
                session, key=f"fund:{account}", debit=external, credit=account,
                amount=FUNDING, currency="USD", kind="adjustment",
            )  # fmt: skip
        owners = {
            int(account): owner
            for account, owner in (
                await session.execute(
                    text("SELECT id, owner_id FROM wallet_accounts WHERE code = 'wallet'")
                )
            ).all()
        }
    return ids, revenue, owners


async def _run_ledger(
    db: Database,
    wallets: list[int],
    *,
    hot: bool,
    standalone: bool,
    seconds: float,
    defer: bool = True,
) -> float:
    deadline = time.perf_counter() + seconds
    done = 0
    run = uuid4().hex[:8]

    async def worker(index: int) -> None:
        nonlocal done
        rng = random.Random(index)
        sequence = 0
        while time.perf_counter() < deadline:
            debit, credit = rng.sample(wallets, 2)
            if hot:
                credit = wallets[0]
                if debit == credit:
                    continue
            sequence += 1
            key, amount = f"b:{run}:{index}:{sequence}", rng.randint(1, 10_000)
            if standalone:
                await ledger.transfer_now(
                    db.primary, key=key, debit=debit, credit=credit, amount=amount,
                    currency="USD", kind="transfer",
                )  # fmt: skip
            else:
                async with db.session() as session:
                    await ledger.transfer(
                        session, key=key, debit=debit, credit=credit, amount=amount,
                        currency="USD", kind="transfer", defer_contended_credit=hot and defer,
                    )  # fmt: skip
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CLIENTS)))
    # The hot unit of work's credits that went pending (ADR 0065) are counted done only once
    # posted: the time their poster takes after the last commit is inside the measurement.
    await ledger.posting_idle(db.primary)
    return done / (time.perf_counter() - started)


async def _run_batches(db: Database, wallets: list[int], revenue: int, seconds: float) -> float:
    """Earnings-shaped load: each unit of work credits 50 random wallets from the one
    revenue account with ``transfer_many`` (what an earnings job does). Every batch holds
    the revenue row's lock, so batches serialise on it: this is the seed 001 ceiling."""
    deadline = time.perf_counter() + seconds
    done = 0
    run = uuid4().hex[:8]

    async def worker(index: int) -> None:
        nonlocal done
        rng = random.Random(1_000 + index)
        sequence = 0
        while time.perf_counter() < deadline:
            sequence += 1
            batch = [
                TransferSpec(f"e:{run}:{index}:{sequence}:{n}", revenue, credit,
                             rng.randint(1, 1_000), "USD", "earning")
                for n, credit in enumerate(rng.sample(wallets, 50))
            ]  # fmt: skip
            async with db.session() as session:
                await ledger.transfer_many(session, batch)
            done += len(batch)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CLIENTS)))
    return done / (time.perf_counter() - started)


async def _run_withdrawals(runtime: Runtime, owners: list[UUID], seconds: float) -> float:
    """Withdrawal requests/s: each one a unit of work through ``request_withdrawal`` for a
    random owner (the cap is lifted in this run's settings: every request is granted)."""
    deadline = time.perf_counter() + seconds
    done = 0
    run = uuid4().hex[:8]

    async def worker(index: int) -> None:
        nonlocal done
        rng = random.Random(2_000 + index)
        sequence = 0
        while time.perf_counter() < deadline:
            sequence += 1
            async with runtime.db.session() as session:
                await wallet_service.request_withdrawal(
                    session, runtime, rng.choice(owners), amount=rng.randint(1_000, 10_000),
                    key=f"w:{run}:{index}:{sequence}",
                )  # fmt: skip
                await session.commit()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CLIENTS)))
    return done / (time.perf_counter() - started)


def _pgbench(pg: EmbeddedPostgres, seconds: float, *, prepared: bool = False) -> float:
    args = [
        pg.pgbin("pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
        "-n", "-c", str(CLIENTS), "-j", "2", "-T", str(max(1, round(seconds))),
        "-M", "prepared" if prepared else "simple", pg.database,
    ]  # fmt: skip
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    if match is None:
        raise RuntimeError(f"unexpected pgbench output:\n{out}")
    return float(match.group(1))


async def _bench(quick: bool) -> None:
    # Many short interleaved windows rather than a few long ones: the machine's speed drifts
    # by ±40 % over tens of seconds, and a ratio is only fair inside one window.
    seconds = 2.0 if quick else 4.0
    repetitions = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="surge-bench-ledger-") as folder:
        pg = EmbeddedPostgres(Path(folder) / "pg", durable=True)
        redis = EmbeddedRedis(Path(folder) / "redis")
        pg.start()
        redis_url = redis.start()
        try:
            console.print(f"[dim]PostgreSQL on port {pg.port}; migrating, pgbench -i -s {SCALE}[/]")
            await asyncio.to_thread(migrate.upgrade, pg.url)
            await asyncio.to_thread(
                subprocess.run,
                [pg.pgbin("pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                 "-i", "-q", "-s", str(SCALE), pg.database],
                check=True, capture_output=True,
            )  # fmt: skip
            # slow_query high: on 2 shared cores a queued hot-wallet transfer is "slow" by
            # design here, and thousands of warnings would cost the run itself.
            config = PoolConfig(max_size=CLIENTS + 4, min_size=CLIENTS, slow_query=60)
            db = Database(pg.url, config=config)
            # The withdrawals' own runtime (the service reads settings and the cache):
            # the same server, a pool of the same size, the daily cap out of the way.
            runtime = Runtime(
                Settings(
                    DATABASE_URL=pg.url, REDIS_URL=redis_url, LOG_LEVEL="WARNING",
                    DB_POOL_MAX=CLIENTS + 4, DB_POOL_MIN=CLIENTS, DB_SLOW_QUERY=timedelta(seconds=60),
                    WALLET_WITHDRAWAL_DAILY_MAX=FUNDING,
                )
            )  # fmt: skip
            await db.start()
            await runtime.start()
            try:
                wallets, revenue, owners = await _setup(db)
                # Warm-up (plans, caches, pool): not measured.
                await _run_ledger(db, wallets, hot=False, standalone=False, seconds=1.0)
                order = [
                    "pgbench", "random_now", "random", "hot_now", "hot", "hot_plain", "batch50",
                    "withdrawals",
                ]  # fmt: skip
                if not quick:
                    order.append("pgbench_prepared")
                results: dict[str, list[float]] = {name: [] for name in order}
                for rep in range(repetitions):
                    for name in order[rep % len(order) :] + order[: rep % len(order)]:
                        if name == "pgbench":
                            value = await asyncio.to_thread(_pgbench, pg, seconds)
                        elif name == "batch50":
                            value = await _run_batches(db, wallets, revenue, seconds)
                        elif name == "withdrawals":
                            value = await _run_withdrawals(runtime, list(owners.values()), seconds)
                        elif name == "pgbench_prepared":
                            value = await asyncio.to_thread(_pgbench, pg, seconds, prepared=True)
                        else:
                            value = await _run_ledger(
                                db, wallets, hot=name.startswith("hot"),
                                standalone=name.endswith("_now"), seconds=seconds,
                                defer=name != "hot_plain",
                            )  # fmt: skip
                        results[name].append(value)
                        console.print(f"[dim]rep {rep + 1} {name}: {value:,.0f}/s[/]")
                async with db.session() as session:
                    problems = await ledger.check_invariants(session)
                    transfers = (
                        await session.execute(text("SELECT count(*) FROM wallet_transfers"))
                    ).scalar_one()
            finally:
                await runtime.stop()
                await db.close()
        finally:
            redis.stop()
            pg.stop()
    m = {name: median(values) for name, values in results.items()}

    def paired(name: str) -> float:
        """Median over repetitions of (ours / pgbench) measured in the same repetition."""
        return median([o / p for o, p in zip(results[name], results["pgbench"], strict=True) if p])

    ratio = paired("random_now")
    ratios = {name: round(paired(name), 3) for name in ROWS}
    hot_over_random = {
        "standalone": round(m["hot_now"] / m["random_now"], 3) if m["random_now"] else 0.0,
        "unit_of_work": round(m["hot"] / m["random"], 3) if m["random"] else 0.0,
    }
    hot_plain_over_random = round(m["hot_plain"] / m["random"], 3) if m["random"] else 0.0
    ok = (
        ratio >= TARGET
        and ratios["random"] >= UNIT_OF_WORK_TARGET
        and min(hot_over_random.values()) >= HOT_TARGET
        and not problems
    )
    for problem in problems[:20]:
        console.print(f"[red]invariant violated: {problem}[/]")
    prepared = m.get("pgbench_prepared", 0.0)

    def row(label: str, name: str) -> tuple[str, str, str]:
        return (label, f"{m[name]:,.0f}  ({ratios[name]:.2f}×)", f"{m['pgbench']:,.0f}")

    report(
        "ledger",
        ours={
            "random_transfers_per_s": round(m["random_now"], 1),
            "random_unit_of_work_transfers_per_s": round(m["random"], 1),
            "hot_wallet_transfers_per_s": round(m["hot_now"], 1),
            "hot_wallet_unit_of_work_transfers_per_s": round(m["hot"], 1),
            "hot_wallet_unit_of_work_default_transfers_per_s": round(m["hot_plain"], 1),
            "hot_plain_over_random_unit_of_work": hot_plain_over_random,
            "earnings_batch50_credits_per_s": round(m["batch50"], 1),
            "withdrawals_per_s": round(m["withdrawals"], 1),
            "withdrawals_over_random_unit_of_work": (
                round(m["withdrawals"] / m["random"], 3) if m["random"] else 0.0
            ),
            "ratios_to_pgbench": ratios,
            "hot_over_random": hot_over_random,
            "invariants_ok": not problems,
            "transfers_checked": transfers,
        },
        baseline={
            "pgbench_tpcb_simple_tps": round(m["pgbench"], 1),
            "pgbench_tpcb_prepared_tps": round(prepared, 1),
        },
        ratio=ratio,
        target=TARGET,
        ok=ok,
        rows=[
            row("random wallets, standalone transfer/s", "random_now"),
            row("random wallets, unit of work transfer/s", "random"),
            row("one hot wallet, standalone transfer/s", "hot_now"),
            row("one hot wallet, unit of work, deferred credits transfer/s", "hot"),
            row("one hot wallet, unit of work, default transfer/s (context)", "hot_plain"),
            row("earnings batches of 50 from revenue, credit/s", "batch50"),
            row("withdrawal requests of random owners, request/s", "withdrawals"),
            ("pgbench tpcb -M prepared (tps)", "", f"{prepared:,.0f}" if prepared else "-"),
            ("target: random standalone / pgbench", f"{ratio:.2f}", f"≥ {TARGET}"),
            (
                "target: random unit of work / pgbench",
                f"{ratios['random']:.2f}",
                f"≥ {UNIT_OF_WORK_TARGET}",
            ),
            (
                "target: hot / random (standalone, unit of work)",
                f"{hot_over_random['standalone']:.2f}, {hot_over_random['unit_of_work']:.2f}",
                f"≥ {HOT_TARGET}",
            ),
            ("context: hot default / random (unit of work)", f"{hot_plain_over_random:.2f}", ""),
            ("invariants after the run", "hold" if not problems else f"{len(problems)} broken", ""),
        ],
        extra={
            "clients": CLIENTS,
            "wallets": WALLETS,
            "pgbench_scale": SCALE,
            "seconds_per_run": seconds,
            "repetitions": repetitions,
            "ratio": "median over repetitions of ours / pgbench in the same repetition",
            "runs": {name: [round(v, 1) for v in values] for name, values in results.items()},
            "durable": True,
        },
        title="surge bench ledger: transfers/s vs pgbench tpcb-like, same server, same run",
    )


def main(quick: bool = False) -> None:
    # uvloop, as the API (uvicorn ``loop="uvloop"``) and the worker run: the stock asyncio
    # loop cost ~25 % more Python per transfer here (ADR 0038) and no product process uses it.
    run_async(lambda: _bench(quick))


if __name__ == "__main__":
    main()
