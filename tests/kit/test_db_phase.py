"""Expected-slow phases (kit.db.phase): start-up bulk reads label themselves, so a slow
statement in them is counted as expected, not as the slow-query alert's symptom; the
threshold is unchanged for everything else, and the label ends with its block."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from structlog.testing import capture_logs

from surge.kit.db import Database, PoolConfig, driver_fetch
from surge.kit.db.phase import current_phase, expected_slow
from surge.kit.telemetry import metrics

SLOW = "SELECT pg_sleep(0.06)"


async def test_a_labelled_phase_is_counted_apart_and_ends_with_its_block(
    server_urls: tuple[str, str],
) -> None:
    db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=2, slow_query=0.05))
    alerting = metrics.DB_SLOW_QUERIES.labels("primary")
    expected = metrics.DB_EXPECTED_SLOW_QUERIES.labels("primary", "startup.test")
    slow_before, expected_before = alerting._value.get(), expected._value.get()
    released = asyncio.Event()

    async def outlives_the_phase() -> None:
        await released.wait()
        async with db.session() as session:
            await session.execute(text(SLOW))

    try:
        with capture_logs() as logs:
            with expected_slow("startup.test"):
                assert current_phase() == "startup.test"
                late = asyncio.create_task(outlives_the_phase())
                async with db.session() as session:
                    await session.execute(text(SLOW))  # SQLAlchemy's cursor events
                    await driver_fetch(session, SLOW)  # the driver fast path
            assert current_phase() is None
            assert alerting._value.get() == slow_before
            assert expected._value.get() == expected_before + 2
            released.set()
            await late  # started inside the phase, runs after it: a real slow query
            assert alerting._value.get() == slow_before + 1
            async with db.session() as session:
                await session.execute(text(SLOW))
            assert alerting._value.get() == slow_before + 2
        # Only the two real ones are warned about (the expected ones log at info, which the
        # suite's log level may filter out before capture).
        events = [entry["event"] for entry in logs]
        assert events.count("db.slow_query") == 2, events
    finally:
        await db.close()
