"""kit.db: a unit of work with nothing for SQLAlchemy to do at commit time commits through
the driver (ADR 0047) — same durability, same on_commit order, same errors, same pool."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, MetaData, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import surge.kit.db as kit_db
from surge.kit.db import Database, driver_fetch, is_unavailable, on_commit, sqlstate
from surge.kit.db.commit import CheckedConnection, CommitRolledBack
from surge.kit.db.pool import IdleTimeoutPool, asyncpg_connect
from tests.fixtures.waiting import eventually


class _Base(DeclarativeBase):
    metadata = MetaData()


class _Item(_Base):
    __tablename__ = "driver_commit_items"
    v: Mapped[int] = mapped_column(BigInteger, primary_key=True)


@pytest.fixture
async def table(db: Database) -> AsyncIterator[str]:
    name = f"driver_commit_{uuid.uuid4().hex[:8]}"
    async with db.session() as session:
        await session.execute(
            text(
                f"CREATE TABLE {name} (v bigint, CONSTRAINT {name}_u UNIQUE (v) "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
        )
        await session.execute(text(f"DROP TABLE IF EXISTS {_Item.__tablename__}"))
        await session.execute(text(f"CREATE TABLE {_Item.__tablename__} (v bigint PRIMARY KEY)"))
    yield name
    async with db.session() as session:
        await session.execute(text(f"DROP TABLE {name}"))
        await session.execute(text(f"DROP TABLE {_Item.__tablename__}"))


@pytest.fixture
def sqlalchemy_commits(monkeypatch: pytest.MonkeyPatch) -> list[Session]:
    """The units of work committed by ``Session.commit()`` (the other path), recorded."""
    seen: list[Session] = []
    original = kit_db._commit_and_close

    def recording(session: Session) -> None:
        seen.append(session)
        original(session)

    monkeypatch.setattr(kit_db, "_commit_and_close", recording)
    return seen


async def _values(db: Database, table: str) -> list[int]:
    async with db.session() as session:
        return list((await session.execute(text(f"SELECT v FROM {table} ORDER BY v"))).scalars())


async def _driver(session: AsyncSession) -> Any:
    connection = await session.connection()
    return (await connection.get_raw_connection()).driver_connection


def _pool(db: Database) -> IdleTimeoutPool:
    pool = db.primary.pool
    assert isinstance(pool, IdleTimeoutPool)
    return pool


class TestCleanUnitOfWork:
    async def test_commits_through_the_driver_and_on_commit_sees_the_write(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        seen: list[list[int]] = []

        async def after() -> None:  # runs after the commit: another session sees the rows
            seen.append(await _values(db, table))

        async with db.session() as session:
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 1)
            await session.execute(text(f"INSERT INTO {table} VALUES (2)"))
            driver = await _driver(session)
            on_commit(session, after)
        assert sqlalchemy_commits == []
        assert seen == [[1, 2]]
        assert not driver.is_in_transaction()
        assert _pool(db).checkedout() == 0

    async def test_a_refused_commit_raises_its_sqlstate_and_writes_nothing(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        fired: list[str] = []

        async def never() -> None:
            fired.append("fired")

        async def duplicate() -> None:
            async with db.session() as session:
                # both inserts pass; the deferred unique check fails at COMMIT
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1), ($1)", 7)
                on_commit(session, never)

        with pytest.raises(DBAPIError) as refused:
            await duplicate()
        assert sqlstate(refused.value) == "23505"
        assert not refused.value.connection_invalidated
        assert sqlalchemy_commits == []
        assert fired == []
        assert await _values(db, table) == []  # and the one connection is usable again
        assert _pool(db).checkedout() == 0

    async def test_a_connection_lost_before_commit_is_an_outage_and_never_pooled_again(
        self, db: Database, table: str
    ) -> None:
        pids: list[int] = []

        async def killed_before_commit() -> None:
            async with db.session() as session:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 3)
                pids.append(await session.scalar(text("SELECT pg_backend_pid()")))
                killer = await asyncpg_connect(db.primary)
                try:
                    await killer.execute("SELECT pg_terminate_backend($1)", pids[0])
                finally:
                    await killer.close()

        with pytest.raises(DBAPIError) as lost:
            await killed_before_commit()
        assert lost.value.connection_invalidated
        assert is_unavailable(lost.value)
        assert await _values(db, table) == []
        async with db.session() as session:
            assert await session.scalar(text("SELECT pg_backend_pid()")) != pids[0]

    async def test_cancelled_before_the_commit_left_rolls_back(
        self, db: Database, table: str
    ) -> None:
        """A request cancelled while its COMMIT waits for the connection (a timeout): the
        COMMIT never left, so the close must roll the transaction back, not hand the pool
        a connection still inside it."""
        entered = asyncio.Event()
        release = asyncio.Event()
        held: dict[str, Any] = {}

        async def unit_of_work() -> None:
            async with db.session() as session:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 5)
                sync = (await session.connection()).sync_connection
                assert sync is not None
                adapted: Any = sync.connection.dbapi_connection
                mutex = adapted._execute_mutex
                held["driver"] = await _driver(session)
                await mutex.acquire()  # the COMMIT will queue behind this
                held["mutex"] = mutex
                entered.set()
                await release.wait()

        task = asyncio.create_task(unit_of_work())
        try:
            await entered.wait()
            release.set()
            # the body returns and the COMMIT queues on the held mutex
            await eventually(lambda: bool(held["mutex"]._waiters))
        finally:
            task.cancel()
            held["mutex"].release()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not held["driver"].is_in_transaction()
        assert await _values(db, table) == []


class TestSqlalchemyCommit:
    async def test_orm_changes_are_flushed_by_sqlalchemy(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        async with db.session() as session:
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 1)
            session.add(_Item(v=11))
        assert len(sqlalchemy_commits) == 1
        assert await _values(db, table) == [1]
        assert await _values(db, _Item.__tablename__) == [11]

    async def test_a_commit_listener_still_hears_the_commit(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        heard: list[str] = []
        async with db.session() as session:
            event.listen(session.sync_session, "after_commit", lambda _s: heard.append("commit"))
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 2)
        assert heard == ["commit"]
        assert len(sqlalchemy_commits) == 1
        assert await _values(db, table) == [2]


class TestCommitAnsweredWithRollback:
    """A caller that catches a failed statement without a savepoint and carries on: the
    transaction is aborted, and PostgreSQL answers its COMMIT with the command tag ROLLBACK —
    a success to anyone who does not read the tag. Both commit paths must raise instead."""

    async def _swallow_a_failure(
        self, session: AsyncSession, table: str, *, listen: bool = False, callback: Any = None
    ) -> None:
        await session.execute(text(f"INSERT INTO {table} VALUES (1)"))
        with pytest.raises(DBAPIError):  # the handler's bug: caught, no savepoint
            await session.execute(text("SELECT 1 / 0"))
        if listen:  # a commit listener sends this unit of work through Session.commit()
            event.listen(session.sync_session, "after_commit", lambda _s: None)
        if callback is not None:
            on_commit(session, callback)

    async def test_through_the_driver(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        with pytest.raises(DBAPIError) as raised:
            async with db.session() as session:
                await self._swallow_a_failure(session, table)
        assert not sqlalchemy_commits  # the driver's path was the one taken
        assert raised.value.orig is not None
        assert isinstance(raised.value.orig.__cause__, CommitRolledBack)
        assert sqlstate(raised.value) == "25P02"
        assert not is_unavailable(raised.value)
        assert await _values(db, table) == []  # nothing written, the connection reused

    async def test_through_sqlalchemy(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        with pytest.raises(DBAPIError) as raised:
            async with db.session() as session:
                await self._swallow_a_failure(session, table, listen=True)
        assert sqlalchemy_commits
        assert sqlstate(raised.value) == "25P02"
        assert await _values(db, table) == []

    async def test_on_commit_callbacks_are_dropped(self, db: Database, table: str) -> None:
        heard: list[str] = []

        async def announce() -> None:
            heard.append("committed")

        with pytest.raises(DBAPIError):
            async with db.session() as session:
                await self._swallow_a_failure(session, table, callback=announce)
        assert heard == []

    async def test_a_real_commit_and_an_explicit_rollback_still_pass(
        self, db: Database, table: str
    ) -> None:
        async with db.session() as session:
            await session.execute(text(f"INSERT INTO {table} VALUES (2)"))
        assert await _values(db, table) == [2]
        async with db.session() as session:  # a ROLLBACK sent as such is no error
            driver = await _driver(session)
            assert isinstance(driver, CheckedConnection)
            await driver.execute("COMMIT")  # the unit of work's own BEGIN, if any
            await driver.execute("BEGIN")
            await driver.execute(f"INSERT INTO {table} VALUES (3)")
            assert await driver.execute("ROLLBACK") == "ROLLBACK"
        assert await _values(db, table) == [2]


class TestHeldCommitInOneStep:
    """The held connection's COMMIT goes straight to asyncpg's protocol (ADR 0064), with
    what ``Transaction.commit()`` and ``CheckedConnection.execute`` would have done."""

    async def test_it_skips_the_transaction_object_and_leaves_asyncpg_tracking_nothing(
        self, db: Database, table: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import asyncpg.transaction  # type: ignore[import-untyped]

        calls: list[str] = []
        original = asyncpg.transaction.Transaction.commit

        async def recording(self: Any) -> None:
            calls.append("Transaction.commit")
            await original(self)

        monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", recording)
        async with db.session() as session:
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 1)
            sync = session.sync_session
            held: Any = sync._surge_held  # type: ignore[attr-defined]
            driver = held.dbapi_connection._connection
            transaction = driver._top_xact
            assert transaction is not None
        assert calls == []
        assert driver._top_xact is None
        assert transaction._state is asyncpg.transaction.TransactionState.COMMITTED
        assert not driver.is_in_transaction()
        assert await _values(db, table) == [1]

    async def test_a_commit_answered_with_rollback_raises_and_parks_nothing(
        self, db: Database, table: str
    ) -> None:
        async def swallowing() -> None:
            async with db.session() as session:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 1)
                with pytest.raises(DBAPIError):  # the handler's bug: caught, no savepoint
                    await driver_fetch(session, "SELECT 1 / $1::int", 0)

        with pytest.raises(DBAPIError) as raised:
            await swallowing()
        assert raised.value.orig is not None
        assert isinstance(raised.value.orig.__cause__, CommitRolledBack)
        assert sqlstate(raised.value) == "25P02"
        pool = db.primary.pool
        assert isinstance(pool, IdleTimeoutPool)
        assert pool.parked() == 0
        assert await _values(db, table) == []
