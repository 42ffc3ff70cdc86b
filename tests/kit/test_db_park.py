"""kit.db: a connection a unit of work held for the driver alone and committed cleanly is
parked for the next unit of work (ADR 0064) — still checked out, skipping the pool's check-in
and check-out — and goes back to the pool whenever anything else needs it, is due for
recycling, has idled past the timeout, or the pool is disposed. Never a connection whose
transaction state is not plainly "idle"."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

from surge.kit.db import Database, PoolConfig, driver_fetch
from surge.kit.db.commit import commit_held
from surge.kit.db.pool import IdleTimeoutPool, asyncpg_connect
from surge.kit.db.unit import UnitOfWorkSession, park
from tests.fixtures.waiting import eventually


def _pool(db: Database) -> IdleTimeoutPool:
    pool = db.primary.pool
    assert isinstance(pool, IdleTimeoutPool)
    return pool


@pytest.fixture
def checkouts(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every check-out a unit of work makes from the pool itself (``Engine.raw_connection``)."""
    engine = db.primary.sync_engine
    seen: list[int] = []
    original: Callable[[], Any] = engine.raw_connection

    def counting() -> Any:
        seen.append(1)
        return original()

    monkeypatch.setattr(engine, "raw_connection", counting)
    return seen


async def _transfer_like(db: Database, table: str, value: int) -> int:
    """A unit of work of driver statements only (the ledger's shape); its backend's pid."""
    async with db.session() as session:
        ((pid,),) = await driver_fetch(session, "SELECT pg_backend_pid()")
        await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", value)
    return int(pid)


async def _values(db: Database, table: str) -> list[int]:
    async with db.session() as session:
        return list((await session.execute(text(f"SELECT v FROM {table} ORDER BY v"))).scalars())


class TestParked:
    async def test_a_clean_driver_commit_parks_and_the_next_unit_of_work_takes_it(
        self, db: Database, table: str, checkouts: list[int]
    ) -> None:
        first = await _transfer_like(db, table, 1)
        pool = _pool(db)
        assert pool.parked() == 1
        # Parked counts as idle, not in use (the gauges read these).
        assert pool.checkedout() == 0
        assert pool.checkedin() == 1
        assert not pool.exhausted()
        second = await _transfer_like(db, table, 2)
        assert second == first
        assert checkouts == [1]  # the second unit of work never went through the pool
        assert await _values(db, table) == [1, 2]

    async def test_sqlalchemy_gets_a_parked_connection_at_once(
        self, server_urls: tuple[str, str], table: str
    ) -> None:
        # A pool of one whose only connection is parked: an engine check-out must not wait.
        db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=1, checkout_timeout=1))
        try:
            pid = await _transfer_like(db, table, 3)
            assert _pool(db).parked() == 1
            async with db.primary.connect() as connection:
                assert await connection.scalar(text("SELECT pg_backend_pid()")) == pid
                assert _pool(db).parked() == 0
            assert _pool(db).checkedout() == 0
        finally:
            await db.close()

    async def test_nothing_is_parked_while_someone_waits_for_a_connection(
        self, server_urls: tuple[str, str], table: str
    ) -> None:
        db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=1, checkout_timeout=5))
        pool = _pool(db)
        holding = asyncio.Event()
        release = asyncio.Event()

        async def unit_of_work() -> None:
            async with db.session() as session:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 4)
                holding.set()
                await release.wait()

        async def engine_reader() -> int:
            async with db.primary.connect() as connection:
                return int(await connection.scalar(text("SELECT 1")))

        try:
            task = asyncio.create_task(unit_of_work())
            await holding.wait()
            reader = asyncio.create_task(engine_reader())
            await eventually(lambda: pool.waiting() == 1)
            release.set()
            await task
            assert await asyncio.wait_for(reader, 2) == 1  # handed over, not parked
            assert pool.parked() == 0
        finally:
            await db.close()

    async def test_a_pool_listener_keeps_every_checkout(self, db: Database, table: str) -> None:
        heard: list[str] = []

        def listener(*_args: Any) -> None:
            heard.append("checkout")

        event.listen(db.primary.pool, "checkout", listener)
        try:
            await _transfer_like(db, table, 5)
            await _transfer_like(db, table, 6)
        finally:
            event.remove(db.primary.pool, "checkout", listener)
        assert heard == ["checkout", "checkout"]
        assert _pool(db).parked() == 0


class TestNeverParked:
    async def test_not_after_a_failed_unit_of_work(self, db: Database, table: str) -> None:
        async def failing() -> None:
            async with db.session() as session:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 7)
                raise RuntimeError("the request failed")

        with pytest.raises(RuntimeError):
            await failing()
        assert _pool(db).parked() == 0

    async def test_not_after_a_refused_statement(self, db: Database, table: str) -> None:
        await _transfer_like(db, table, 8)
        with pytest.raises(DBAPIError):
            await _transfer_like(db, table, 8)  # duplicate key: the unit of work rolls back
        assert _pool(db).parked() == 0
        assert await _values(db, table) == [8]

    @pytest.mark.parametrize("how", ["statement", "bare_get_bind"])
    async def test_not_once_sqlalchemy_was_handed_the_connection(
        self, db: Database, table: str, how: str
    ) -> None:
        async with db.session() as session:
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 9)
            if how == "statement":
                await session.execute(text(f"INSERT INTO {table} VALUES (10)"))
            else:
                session.get_bind()
        assert _pool(db).parked() == 0
        assert _pool(db).checkedout() == 0

    async def test_not_a_connection_inside_a_transaction(self, db: Database, table: str) -> None:
        async with db.session() as session:
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 11)
            sync = session.sync_session
            assert isinstance(sync, UnitOfWorkSession)
            assert not park(sync)  # the driver's transaction is open
            assert sync._surge_held is not None
        assert _pool(db).parked() == 1  # parked once committed
        assert await _values(db, table) == [11]

    async def test_not_a_connection_in_a_transaction_nobody_tracks(self, db: Database) -> None:
        # What a BEGIN cancelled in flight leaves (``test_db_pool_reset``): the server is in
        # a transaction that neither the adapter nor asyncpg's transaction object records.
        async with db.session() as session:
            await driver_fetch(session, "SELECT 1")
            assert await commit_held(session)
            sync = session.sync_session
            assert isinstance(sync, UnitOfWorkSession)
            assert sync._surge_held is not None
            driver: Any = sync._surge_held.dbapi_connection._connection  # type: ignore[union-attr]
            await driver.execute("BEGIN")
            assert not park(sync)
            await driver.execute("ROLLBACK")
            assert park(sync)
        assert _pool(db).parked() == 1


class TestBackToThePool:
    @pytest.mark.parametrize("why", ["recycle", "pool_invalidated"])
    async def test_a_connection_due_for_recycling_is_recycled_not_taken(
        self, db: Database, table: str, why: str
    ) -> None:
        first = await _transfer_like(db, table, 12)
        pool = _pool(db)
        if why == "recycle":
            pool._recycle = 0  # every connection is older than this
        else:
            parked = pool._parked[-1][0]
            pool._invalidate(parked, _checkin=False)  # what a disconnect elsewhere does
        second = await _transfer_like(db, table, 13)
        assert second != first  # a new backend: the record was recycled at check-out
        assert await _values(db, table) == [12, 13]

    async def test_the_reaper_takes_back_what_idled_past_the_timeout(
        self, server_urls: tuple[str, str], table: str
    ) -> None:
        db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=2))
        pool = _pool(db)
        try:
            await _transfer_like(db, table, 14)
            assert await pool.reap(3600) == 0  # parked a moment ago: stays
            assert pool.parked() == 1
            assert await pool.reap(0) == 1  # idle past the timeout, above the floor: closed
            assert pool.parked() == 0
            assert pool.opened() == 0
        finally:
            await db.close()

    async def test_close_closes_parked_connections(
        self, server_urls: tuple[str, str], table: str
    ) -> None:
        name = f"surge-park-{uuid.uuid4().hex[:8]}"
        db = Database(server_urls[0], config=PoolConfig(min_size=0, application_name=name))
        await _transfer_like(db, table, 15)
        assert _pool(db).parked() == 1
        await db.close()
        probe = await asyncpg_connect(db.primary)
        try:

            async def gone() -> bool:
                count = await probe.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
                )
                return bool(count == 0)

            await eventually(gone)
        finally:
            await probe.close()
