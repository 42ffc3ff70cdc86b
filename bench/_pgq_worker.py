"""A pgqueuer 1.6 worker process for ``surge bench jobs``: one no-op entrypoint, the
configuration of the research bake-off (batch 8, 16 concurrent tasks, heartbeat 30 s)."""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import uvloop
from pgqueuer import PgQueuer


async def main(dsn: str, concurrency: int) -> None:
    connection = await asyncpg.connect(dsn)
    pgq = PgQueuer.from_asyncpg_connection(connection)

    @pgq.entrypoint("noop")
    async def noop(job: Any) -> None:
        return None

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pgq.shutdown.set)
    await pgq.run(
        batch_size=max(1, concurrency // 2),
        max_concurrent_tasks=concurrency,
        heartbeat_timeout=timedelta(seconds=30),
    )
    await connection.close()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(sys.argv[1], int(sys.argv[2])))
