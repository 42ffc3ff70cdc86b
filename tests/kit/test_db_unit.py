"""kit.db: a unit of work whose statements go to the driver holds its pooled connection
without SQLAlchemy's session shell (ADR 0057) — same transaction, same errors, same pool,
and SQLAlchemy adopts the connection the moment it is needed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import surge.kit.db as kit_db
from surge.kit.db import Database, driver_fetch, is_unavailable, on_commit, sqlstate
from surge.kit.db.pool import IdleTimeoutPool, asyncpg_connect
from surge.kit.db.unit import UnitOfWorkSession
from tests.fixtures.waiting import eventually


@pytest.fixture
async def table(db: Database) -> AsyncIterator[str]:
    name = f"held_{uuid.uuid4().hex[:8]}"
    async with db.session() as session:
        await session.execute(
            text(
                f"CREATE TABLE {name} (v bigint, CONSTRAINT {name}_u UNIQUE (v) "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    yield name
    async with db.session() as session:
        await session.execute(text(f"DROP TABLE {name}"))


@pytest.fixture
def sqlalchemy_commits(monkeypatch: pytest.MonkeyPatch) -> list[Session]:
    """The units of work committed by ``Session.commit()`` (SQLAlchemy's path), recorded."""
    seen: list[Session] = []
    original = kit_db._commit_and_close

    def recording(session: Session) -> None:
        seen.append(session)
        original(session)

    monkeypatch.setattr(kit_db, "_commit_and_close", recording)
    return seen


def _held_driver(session: AsyncSession) -> Any:
    """The asyncpg connection the unit of work holds, looked at without adopting it."""
    sync = session.sync_session
    assert isinstance(sync, UnitOfWorkSession)
    assert sync._surge_held is not None, "the unit of work holds no connection of its own"
    assert sync._surge_adopted is None, "SQLAlchemy adopted the connection"
    return sync._surge_held.dbapi_connection._connection  # type: ignore[union-attr]


async def _values(db: Database, table: str) -> list[int]:
    async with db.session() as session:
        return list((await session.execute(text(f"SELECT v FROM {table} ORDER BY v"))).scalars())


def _pool(db: Database) -> IdleTimeoutPool:
    pool = db.primary.pool
    assert isinstance(pool, IdleTimeoutPool)
    return pool


async def _kill(db: Database, pid: int) -> None:
    killer = await asyncpg_connect(db.primary)
    try:
        await killer.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await killer.close()


async def _sleeping(db: Database) -> bool:
    probe = await asyncpg_connect(db.primary)
    try:
        return bool(
            await probe.fetchval(
                "SELECT count(*) > 0 FROM pg_stat_activity "
                "WHERE state = 'active' AND query LIKE 'SELECT pg_sleep%'"
            )
        )
    finally:
        await probe.close()


class TestHeldConnection:
    async def test_driver_statements_never_open_a_sqlalchemy_transaction(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        seen: list[list[int]] = []

        async def after() -> None:
            seen.append(await _values(db, table))

        async with db.session() as session:
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 1)
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 2)
            driver = _held_driver(session)
            assert driver.is_in_transaction()
            assert session.sync_session._transaction is None  # SQLAlchemy holds nothing
            on_commit(session, after)
        assert sqlalchemy_commits == []
        assert seen == [[1, 2]]  # committed before on_commit ran
        assert not driver.is_in_transaction()
        assert _pool(db).checkedout() == 0

    async def test_sqlalchemy_adopts_the_held_connection_and_its_transaction(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        async with db.session() as session:
            (first,) = await driver_fetch(session, "SELECT txid_current()")
            driver = _held_driver(session)
            await session.execute(text(f"INSERT INTO {table} VALUES (4)"))
            assert await session.scalar(text("SELECT txid_current()")) == first[0]
            raw = await (await session.connection()).get_raw_connection()
            assert raw.driver_connection is driver  # one connection, not a second checkout
            assert driver is not None
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 5)
        assert await _values(db, table) == [4, 5]
        assert not driver.is_in_transaction()
        assert _pool(db).checkedout() == 0

    async def test_an_error_rolls_back_and_returns_the_connection_outside_a_transaction(
        self, db: Database, table: str
    ) -> None:
        drivers: list[Any] = []

        async def failing() -> None:
            async with db.session() as session:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 6)
                drivers.append(_held_driver(session))
                raise RuntimeError("the request failed")

        with pytest.raises(RuntimeError):
            await failing()
        assert not drivers[0].is_in_transaction()
        assert _pool(db).checkedout() == 0
        assert await _values(db, table) == []

    # After a bare ``get_bind()`` too: SQLAlchemy was handed the held connection but began
    # nothing on it, so the held transaction is still the unit of work's to roll back.
    @pytest.mark.parametrize("bare_get_bind", [False, True], ids=["plain", "bare_get_bind"])
    async def test_a_rollback_inside_the_unit_of_work_undoes_the_held_transaction(
        self, db: Database, table: str, bare_get_bind: bool
    ) -> None:
        async with db.session() as session:
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 13)
            driver = _held_driver(session)
            if bare_get_bind:
                session.get_bind()
            await session.rollback()  # the caller gave up on what it wrote so far
            assert not driver.is_in_transaction()
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 14)
        assert await _values(db, table) == [14]
        assert _pool(db).checkedout() == 0

    async def test_a_bare_get_bind_after_a_driver_write_keeps_the_write(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        # ``ledger.system_account`` reads the engine through ``get_bind()``: SQLAlchemy is
        # handed the held connection but begins nothing on it. The driver's transaction is
        # still the unit of work's to commit (it was rolled back by the pool's check-in).
        seen: list[list[int]] = []

        async def after() -> None:
            seen.append(await _values(db, table))

        async with db.session() as session:
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 15)
            assert session.get_bind().engine is db.primary.sync_engine
            on_commit(session, after)
        assert seen == [[15]]
        assert sqlalchemy_commits == []
        assert _pool(db).checkedout() == 0

    async def test_a_held_write_and_a_sqlalchemy_write_after_a_bare_get_bind_commit_together(
        self, db: Database, table: str
    ) -> None:
        async with db.session() as session:
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 18)
            session.get_bind()
            await session.execute(text(f"INSERT INTO {table} VALUES (19)"))
            assert session.in_transaction()  # SQLAlchemy's transaction took the connection
        assert await _values(db, table) == [18, 19]
        assert _pool(db).checkedout() == 0

    async def test_an_empty_unit_of_work_commits_nothing_and_runs_its_callbacks(
        self, db: Database, sqlalchemy_commits: list[Session]
    ) -> None:
        ran: list[str] = []

        async def after() -> None:
            ran.append("after")

        async with db.session() as session:
            on_commit(session, after)
        assert sqlalchemy_commits == []  # no empty session transaction begun and committed
        assert ran == ["after"]
        assert _pool(db).checkedout() == 0

    async def test_an_empty_unit_of_work_with_a_commit_listener_keeps_sqlalchemy_path(
        self, db: Database, sqlalchemy_commits: list[Session]
    ) -> None:
        heard: list[str] = []
        async with db.session() as session:
            event.listen(session.sync_session, "after_commit", lambda _s: heard.append("commit"))
        assert heard == ["commit"]
        assert len(sqlalchemy_commits) == 1

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
                _held_driver(session)
                on_commit(session, never)

        with pytest.raises(DBAPIError) as refused:
            await duplicate()
        assert sqlstate(refused.value) == "23505"
        assert not refused.value.connection_invalidated
        assert sqlalchemy_commits == []
        assert fired == []
        assert await _values(db, table) == []  # the one pooled connection is usable again
        assert _pool(db).checkedout() == 0


class TestHeldConnectionLost:
    async def test_killed_before_the_commit_is_an_outage_and_never_pooled_again(
        self, db: Database, table: str
    ) -> None:
        pids: list[int] = []

        async def killed_before_commit() -> None:
            async with db.session() as session:
                ((pid,),) = await driver_fetch(session, "SELECT pg_backend_pid()")
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 8)
                _held_driver(session)
                pids.append(pid)
                await _kill(db, pid)

        with pytest.raises(DBAPIError) as lost:
            await killed_before_commit()
        assert lost.value.connection_invalidated
        assert is_unavailable(lost.value)
        assert _pool(db).checkedout() == 0
        assert await _values(db, table) == []
        async with db.session() as session:
            ((again,),) = await driver_fetch(session, "SELECT pg_backend_pid()")
        assert again != pids[0]

    async def test_killed_under_a_statement_is_an_outage_and_the_unit_rolls_back(
        self, db: Database, table: str
    ) -> None:
        async def killed_under_a_statement() -> None:
            async with db.session() as session:
                ((pid,),) = await driver_fetch(session, "SELECT pg_backend_pid()")
                await _kill(db, pid)
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 9)

        with pytest.raises(DBAPIError) as lost:
            await killed_under_a_statement()
        assert lost.value.connection_invalidated
        assert is_unavailable(lost.value)
        assert _pool(db).checkedout() == 0
        assert await _values(db, table) == []


class TestHeldConnectionCancelled:
    async def test_cancelled_mid_statement_rolls_back_and_pools_a_clean_connection(
        self, db: Database, table: str
    ) -> None:
        started = asyncio.Event()
        drivers: list[Any] = []

        async def unit_of_work() -> None:
            async with db.session() as session:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 10)
                drivers.append(_held_driver(session))
                started.set()
                await driver_fetch(session, "SELECT pg_sleep(30)")

        task = asyncio.create_task(unit_of_work())
        await started.wait()
        await eventually(lambda: _sleeping(db))  # the statement is running on the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _pool(db).checkedout() == 0
        assert await _values(db, table) == []
        assert not drivers[0].is_in_transaction()

    async def test_cancelled_before_the_commit_left_rolls_back(
        self, db: Database, table: str
    ) -> None:
        """Cancelled while the COMMIT waits for the connection (a request timeout): the
        COMMIT never left, so the pool's check-in rolls the transaction back."""
        entered = asyncio.Event()
        go = asyncio.Event()
        held: dict[str, Any] = {}

        async def unit_of_work() -> None:
            async with db.session() as session:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 11)
                held["driver"] = _held_driver(session)
                sync = session.sync_session
                assert isinstance(sync, UnitOfWorkSession)
                assert sync._surge_held is not None
                mutex = sync._surge_held.dbapi_connection._execute_mutex  # type: ignore[union-attr]
                await mutex.acquire()  # the COMMIT will queue behind this
                held["mutex"] = mutex
                entered.set()
                await go.wait()

        task = asyncio.create_task(unit_of_work())
        try:
            await entered.wait()
            go.set()
            await eventually(lambda: bool(held["mutex"]._waiters))
        finally:
            task.cancel()
            held["mutex"].release()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not held["driver"].is_in_transaction()
        assert _pool(db).checkedout() == 0
        assert await _values(db, table) == []


class TestSqlalchemyKeepsItsPath:
    async def test_an_engine_commit_listener_hears_every_commit(
        self, db: Database, table: str, sqlalchemy_commits: list[Session]
    ) -> None:
        heard: list[str] = []

        def listener(_connection: Any) -> None:
            heard.append("commit")

        event.listen(db.primary.sync_engine, "commit", listener)
        try:
            async with db.session() as session:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 12)
                assert session.sync_session._transaction is not None  # SQLAlchemy's own
        finally:
            event.remove(db.primary.sync_engine, "commit", listener)
        assert heard == ["commit"]
        assert len(sqlalchemy_commits) == 1
        assert await _values(db, table) == [12]
