"""kit.db: a connection that comes back to the pool inside a transaction its SQLAlchemy
adapter does not track (a task cancelled while its BEGIN or its ROLLBACK was on the wire)
is rolled back by the pool's reset, not handed to the next unit of work poisoned.

The ``db`` fixture pools one connection, so the next unit of work always gets the same one.
The states are built directly: random cancellations hit the window about once in 600 units
of work (enough to poison a pooled connection for good in a full test run, not enough for
a test that can fail on demand)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from surge.kit.db import Database


async def _driver(db: Database) -> Any:
    """The pooled connection's asyncpg connection, checked out and returned (pool of one)."""
    async with db.primary.connect() as connection:
        raw = await connection.get_raw_connection()
        return raw.driver_connection


class TestUntrackedTransactionAtCheckin:
    async def test_a_transaction_the_adapter_never_recorded_is_rolled_back(
        self, db: Database, table: str
    ) -> None:
        # What a BEGIN cancelled in flight leaves: the server is in a transaction (here with
        # a write in it), asyncpg knows, SQLAlchemy's adapter does not.
        async with db.primary.connect() as connection:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            await connection.commit()  # SQLAlchemy's own transaction ends: nothing tracked
            await driver.execute("BEGIN")
            await driver.execute(f"INSERT INTO {table} VALUES (1)")
            assert driver.is_in_transaction()
        # Back in the pool: the next unit of work gets the same connection, clean.
        assert await _driver(db) is driver
        assert not driver.is_in_transaction()
        async with db.session() as session:
            assert await session.scalar(text(f"SELECT count(*) FROM {table}")) == 0
            await session.execute(text(f"INSERT INTO {table} VALUES (2)"))
        async with db.session() as session:
            assert await session.scalar(text(f"SELECT array_agg(v) FROM {table}")) == [2]

    async def test_a_failed_driver_transaction_object_left_behind_is_cleared(
        self, db: Database
    ) -> None:
        # What a cancelled ROLLBACK or BEGIN leaves on the asyncpg side: ``_top_xact`` set
        # to a transaction object the adapter dropped.
        async with db.primary.connect() as connection:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            await connection.commit()
            await driver.transaction().start()
        async with db.session() as session:
            assert await session.scalar(text("SELECT 1")) == 1
        assert not driver.is_in_transaction()
