"""kit.db fast paths: BEGIN pipelined with a unit of work's first driver statement (ADR 0030),
and the driver statements counted by the slow-query log like SQLAlchemy's."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from structlog.testing import capture_logs

from surge.kit.db import (
    Database,
    PoolConfig,
    autocommit_fetch,
    driver_fetch,
    is_unavailable,
    pipeline,
    sqlstate,
)
from surge.kit.telemetry import metrics


async def _driver(session: AsyncSession) -> Any:
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection


async def _values(db: Database, table: str) -> list[int]:
    async with db.session() as session:
        return list((await session.execute(text(f"SELECT v FROM {table} ORDER BY v"))).scalars())


async def test_pipelined_begin_is_one_round_trip_in_the_session_transaction(
    db: Database, table: str
) -> None:
    """Once its statement is prepared on the connection, a unit of work whose first statement
    goes to the driver sends BEGIN and that statement as one batch: one query on the wire
    where the plain path made two (BEGIN, then the statement). The transaction is the
    session's: later statements see it, COMMIT keeps the write, ROLLBACK removes it."""
    insert = f"INSERT INTO {table} VALUES ($1) RETURNING pg_current_xact_id()::text"
    sent: list[int] = []
    for value in (1, 2):  # the first prepares the statement (a round trip of its own)
        async with db.session() as session:
            driver = await _driver(session)
            before = driver._protocol.queries_count
            [row] = await driver_fetch(session, insert, value)
            sent.append(driver._protocol.queries_count - before)
            assert driver.is_in_transaction()
            same = await session.scalar(text("SELECT pg_current_xact_id()::text"))
            assert same == row[0]
    assert sent[1] == 1, sent  # was 2 without the pipeline: BEGIN, then the INSERT

    async def rolled_back() -> None:
        async with db.session() as session:
            await driver_fetch(session, insert, 3)
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await rolled_back()
    assert await _values(db, table) == [1, 2]
    async with db.session() as session:  # the connection went back idle, not in a transaction
        assert not (await _driver(session)).is_in_transaction()


async def test_pipelined_begin_and_its_statement_leave_in_one_tcp_segment(
    db: Database, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The BEGIN is held in the kernel (``TCP_CORK``) until asyncpg has written the
    statement, then released: one segment and one wake-up of the server instead of two
    writes (ADR 0038). Checked at the release: the socket is still corked and the statement
    was already issued; afterwards nothing is held back."""
    insert = f"INSERT INTO {table} VALUES ($1)"
    original = pipeline._uncork
    seen: list[tuple[int, int]] = []
    driver: Any = None

    def spy(sock: Any) -> None:
        corked = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)
        seen.append((corked, driver._protocol.queries_count - before))
        original(sock)

    monkeypatch.setattr(pipeline, "_uncork", spy)
    for value in (1, 2):
        async with db.session() as session:
            driver = await _driver(session)
            before = driver._protocol.queries_count
            await driver_fetch(session, insert, value)
            sock = driver._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
    assert seen == [(1, 1), (1, 1)], seen  # corked until the statement was issued, then freed
    assert await _values(db, table) == [1, 2]


async def test_pipelined_begin_with_a_failing_statement_rolls_back_cleanly(
    db: Database, table: str
) -> None:
    """The server refuses the statement after the BEGIN ran: the error is the DBAPIError
    ``session.execute`` raises (SQLSTATE kept, not "unavailable"), the unit of work rolls
    back, and the same connection serves the next one."""
    insert = f"INSERT INTO {table} VALUES ($1)"
    async with db.session() as session:
        await driver_fetch(session, insert, 1)
        pid = await session.scalar(text("SELECT pg_backend_pid()"))

    async def duplicate() -> None:
        async with db.session() as session:
            await driver_fetch(session, insert, 1)

    with pytest.raises(DBAPIError) as caught:
        await duplicate()
    assert sqlstate(caught.value) == "23505"
    assert not is_unavailable(caught.value)
    async with db.session() as session:
        assert await session.scalar(text("SELECT pg_backend_pid()")) == pid
        await driver_fetch(session, insert, 2)
    assert await _values(db, table) == [1, 2]


async def test_pipelined_begin_with_arguments_that_cannot_be_encoded_drops_the_connection(
    db: Database, table: str
) -> None:
    """asyncpg refuses the arguments after the BEGIN was written and before the statement
    was: the connection's state is unknown, so it is discarded (never pooled again) and the
    caller gets the error the plain path gave — a bad value, not an outage."""
    insert = f"INSERT INTO {table} VALUES ($1)"
    async with db.session() as session:
        await driver_fetch(session, insert, 1)
        pid = await session.scalar(text("SELECT pg_backend_pid()"))

    async def too_big() -> None:
        async with db.session() as session:
            await driver_fetch(session, insert, 2**70)

    with pytest.raises(DBAPIError) as caught:
        await too_big()
    assert not is_unavailable(caught.value)
    async with db.session() as session:
        assert await session.scalar(text("SELECT pg_backend_pid()")) != pid
        await driver_fetch(session, insert, 3)
    assert await _values(db, table) == [1, 3]


async def test_pipelined_begin_cancelled_mid_statement_rolls_back(db: Database, table: str) -> None:
    """A unit of work cancelled while its pipelined first statement runs (a request timeout)
    leaves nothing written and a connection that serves the next unit of work."""
    slow = f"INSERT INTO {table} SELECT $1::bigint FROM pg_sleep($2::float8)"
    async with db.session() as session:
        await driver_fetch(session, slow, 1, 0.0)

    async def long_one() -> None:
        async with db.session() as session:
            await driver_fetch(session, slow, 2, 5.0)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(long_one(), 0.3)
    async with db.session() as session:
        await driver_fetch(session, slow, 3, 0.0)
    assert await _values(db, table) == [1, 3]


async def test_no_pipeline_outside_the_default_isolation(db: Database, table: str) -> None:
    """A REPEATABLE READ unit of work keeps asyncpg's own BEGIN (its isolation clause)."""
    insert = f"INSERT INTO {table} VALUES ($1)"
    for value in (1, 2):
        async with db.session() as session:
            await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            driver = await _driver(session)
            before = driver._protocol.queries_count
            await driver_fetch(session, insert, value)
            assert driver._protocol.queries_count - before == 2  # BEGIN ..., then the INSERT
            level = await session.scalar(text("SHOW transaction_isolation"))
            assert level == "repeatable read"
    assert await _values(db, table) == [1, 2]


async def test_driver_statements_count_in_the_slow_query_log(server_urls: tuple[str, str]) -> None:
    """The fast paths skip SQLAlchemy's cursor events; they are timed all the same: a slow
    ``driver_fetch``, ``autocommit_fetch`` and job-engine ``pooled`` statement are each
    logged and counted once, a fast one not at all."""
    from surge.kit.jobs import _driver

    db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=2, slow_query=0.05))
    counter = metrics.DB_SLOW_QUERIES.labels("primary")
    before = counter._value.get()
    try:
        with capture_logs() as logs:
            async with db.session() as session:
                await driver_fetch(session, "SELECT 1")
                await driver_fetch(session, "SELECT pg_sleep(0.06)")
            await autocommit_fetch(db.primary, "SELECT pg_sleep(0.06), 'autocommit'")
            await _driver.pooled(db.primary, "SELECT pg_sleep(0.06), 'pooled'", ())
            await _driver.pooled(db.primary, "SELECT 2", ())
        slow = [entry for entry in logs if entry["event"] == "db.slow_query"]
        assert len(slow) == 3, slow
        assert all("pg_sleep" in entry["statement"] for entry in slow)
        assert all(entry["duration_ms"] >= 60 for entry in slow)
        assert counter._value.get() == before + 3
    finally:
        await db.close()
