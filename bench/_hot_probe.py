"""A short probe of ``bench/ledger.py``'s two unit-of-work rows, random and hot, alternated
(ADR 0065): the hot / random ratio without pgbench, the standalone rows, batches and
withdrawals, so a before/after pair of runs fits in a few minutes.

    python -m bench._hot_probe [seconds per run] [repetitions]

Not part of ``surge bench all`` and writes no result file: a diagnostic. The same durable
embedded PostgreSQL, setup and ``_run_ledger`` as the bench, so it measures whatever that
tree's hot row does (on a tree before ADR 0065, every hot transfer queues on the row lock).
After the runs the ledger's invariant checker must find nothing.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import console, run_async
from bench.ledger import CLIENTS, _run_ledger, _setup
from surge.kit.db import Database, PoolConfig, migrate
from surge.kit.embedded import EmbeddedPostgres
from surge.wallet.ledger import ledger


async def _probe(seconds: float, repetitions: int) -> None:
    with tempfile.TemporaryDirectory(prefix="surge-hot-probe-") as folder:
        pg = EmbeddedPostgres(Path(folder) / "pg", durable=True)
        pg.start()
        try:
            await asyncio.to_thread(migrate.upgrade, pg.url)
            config = PoolConfig(max_size=CLIENTS + 4, min_size=CLIENTS, slow_query=60)
            db = Database(pg.url, config=config)
            await db.start()
            try:
                wallets, _, _ = await _setup(db)
                for hot in (False, True):  # warm-up, not measured
                    await _run_ledger(db, wallets, hot=hot, standalone=False, seconds=1.0)
                runs: dict[str, list[float]] = {"random": [], "hot": []}
                for rep in range(repetitions):
                    for name in ("random", "hot") if rep % 2 == 0 else ("hot", "random"):
                        value = await _run_ledger(
                            db, wallets, hot=name == "hot", standalone=False, seconds=seconds
                        )
                        runs[name].append(value)
                        console.print(f"rep {rep + 1} {name}: {value:,.0f}/s")
                async with db.session() as session:
                    problems = await ledger.check_invariants(session)
            finally:
                await db.close()
        finally:
            pg.stop()
    random_, hot_ = statistics.median(runs["random"]), statistics.median(runs["hot"])
    paired = statistics.median(h / r for h, r in zip(runs["hot"], runs["random"], strict=True))
    console.print(
        f"random {random_:,.0f}/s, hot {hot_:,.0f}/s: hot / random {hot_ / random_:.3f} "
        f"(paired median {paired:.3f}); invariants "
        + ("hold" if not problems else f"broken: {problems[:5]}")
    )


def main(seconds: float = 3.0, repetitions: int = 4) -> None:
    run_async(lambda: _probe(seconds, repetitions))


if __name__ == "__main__":
    main(
        float(sys.argv[1]) if len(sys.argv) > 1 else 3.0,
        int(sys.argv[2]) if len(sys.argv) > 2 else 4,
    )
