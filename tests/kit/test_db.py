"""kit.db: the seed-000 pool (max 20, floor 5, idle timeout), replicas with fallback, UoW."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

from surge.app import create_app
from surge.kit.db import (
    Database,
    PoolConfig,
    driver_fetch,
    engine_options,
    is_unavailable,
    migrate,
    on_commit,
    sqlstate,
)
from surge.kit.db.pool import IdleTimeoutPool, asyncpg_connect
from surge.kit.embedded import free_port
from surge.kit.telemetry import metrics
from surge.kit.web.deps import SessionDep
from tests.fixtures.clients import app_client
from tests.fixtures.settings import make_settings


def _pool(db: Database) -> IdleTimeoutPool:
    pool = db.primary.pool
    assert isinstance(pool, IdleTimeoutPool)
    return pool


async def _server_connections(db: Database, application_name: str) -> int:
    async with db.primary.connect() as conn:
        count = await conn.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
            {"n": application_name},
        )
    return int(count or 0)  # the asking connection is one of the pool's own


@pytest.fixture
async def busy_app(
    server_urls: tuple[str, str],
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = make_settings(*server_urls, DB_POOL_TIMEOUT=30)
    app = create_app(settings)

    @app.get("/t/sleep")
    async def sleep(session: SessionDep) -> dict[str, int]:
        await session.execute(text("SELECT pg_sleep(0.05)"))
        return {"ok": 1}

    async for client in app_client(app):
        yield app, client


async def test_50_concurrent_requests_hold_at_most_20_connections(
    busy_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    """Seed 000 checklist: 50 concurrent requests never hold more than 20 connections."""
    app, client = busy_app
    db: Database = app.state.runtime.db
    pool = _pool(db)
    peak = 0
    done = False

    async def watch() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, pool.opened())
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    responses = await asyncio.gather(*(client.get("/t/sleep") for _ in range(50)))
    done = True
    await watcher
    assert all(r.status_code == 200 for r in responses)
    assert peak == 20, f"the pool should have been used to its limit, peaked at {peak}"
    assert pool.opened() <= 20
    assert pool.waiting() == 0


async def test_idle_connections_close_down_to_the_floor(server_urls: tuple[str, str]) -> None:
    config = PoolConfig(max_size=10, min_size=3, idle_timeout=0.3, application_name="surge-idle")
    db = Database(server_urls[0], config=config)
    await db.start()
    try:
        assert _pool(db).opened() == 3, "the floor is opened at start"

        async def hold() -> None:
            async with db.primary.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(0.05)"))

        await asyncio.gather(*(hold() for _ in range(10)))
        assert _pool(db).opened() == 10
        assert await _server_connections(db, "surge-idle") >= 9
        for _ in range(50):
            await asyncio.sleep(0.1)
            if _pool(db).opened() == 3:
                break
        assert _pool(db).opened() == 3, "idle connections above the floor were not closed"
        assert await _server_connections(db, "surge-idle") == 3
    finally:
        await db.close()


async def test_read_session_uses_replica_then_falls_back(server_urls: tuple[str, str]) -> None:
    dead = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/surge"
    config = PoolConfig(min_size=0, replica_retry=60, connect_timeout=1)
    db = Database(server_urls[0], [server_urls[0], dead], config=config)
    try:
        seen = set()
        for _ in range(4):
            async with db.read_session() as session:
                await session.execute(text("SELECT 1"))
                seen.add(session.bind.engine.url.port if session.bind else None)
        # both reads hit a working server: the live replica, or the primary instead of the dead one
        assert db._replica_down_until[1] > 0, "the dead replica was not marked down"
        assert db._replica_down_until[0] == 0
        assert _pool(db).checkedout() == 0
    finally:
        await db.close()


async def test_read_session_runs_without_begin_and_leaves_the_pool_transactional(
    server_urls: tuple[str, str],
) -> None:
    # One pooled connection, so the write session below reuses the read's connection.
    db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=1))
    # How long ago this statement's transaction began: ~0 when each statement is its own.
    transaction_age = text(
        "SELECT extract(epoch FROM clock_timestamp() - xact_start) FROM pg_stat_activity "
        "WHERE pid = pg_backend_pid()"
    )
    try:
        async with db.read_session() as session:
            await session.execute(text("SELECT pg_sleep(0.1)"))
            # Autocommit: no BEGIN/ROLLBACK round trips, no transaction spanning statements.
            assert await session.scalar(transaction_age) < 0.09
        async with db.session() as session:
            await session.execute(text("SELECT pg_sleep(0.1)"))
            # A unit of work is still one transaction, on the same (reset) connection.
            assert await session.scalar(transaction_age) >= 0.1
        assert _pool(db).checkedout() == 0
    finally:
        await db.close()


async def test_unit_of_work_commits_once_and_runs_on_commit(server_urls: tuple[str, str]) -> None:
    db = Database(server_urls[0], config=PoolConfig(min_size=0))
    fired: list[str] = []
    try:
        async with db.session() as session:
            await session.execute(text("CREATE TEMP TABLE IF NOT EXISTS uow_t (v int)"))

            async def hook() -> None:
                fired.append("committed")

            on_commit(session, hook)
        assert fired == ["committed"]

        async def never() -> None:
            fired.append("rolled back but fired")

        async def rolled_back() -> None:
            async with db.session() as session:
                on_commit(session, never)
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await rolled_back()
        assert fired == ["committed"], "a rolled-back unit of work must not fire on_commit"
    finally:
        await db.close()


async def test_a_failed_on_commit_callback_is_counted_and_the_next_still_runs(
    server_urls: tuple[str, str],
) -> None:
    """After the commit a failing side effect cannot undo the write, so it is not raised:
    it was only logged, and nothing told a dashboard how many side effects were lost."""
    db = Database(server_urls[0], config=PoolConfig(min_size=0))
    failures = metrics.DB_ON_COMMIT_FAILURES
    before = failures._value.get()
    fired: list[str] = []

    async def fails() -> None:
        raise RuntimeError("the side effect failed")

    async def runs() -> None:
        fired.append("ran")

    try:
        with capture_logs() as logs:
            async with db.session() as session:
                on_commit(session, fails)
                on_commit(session, runs)
        assert fired == ["ran"]
        assert failures._value.get() == before + 1
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["db.on_commit_failed"]
    finally:
        await db.close()


def test_pgbouncer_mode_disables_statement_caches() -> None:
    options = engine_options("postgresql+asyncpg://x@h/db", PoolConfig(pgbouncer=True))
    args = options["connect_args"]
    assert args["statement_cache_size"] == 0
    assert args["prepared_statement_cache_size"] == 0
    assert args["prepared_statement_name_func"]() != args["prepared_statement_name_func"]()
    assert "statement_timeout" not in args["server_settings"]
    direct = engine_options("postgresql+asyncpg://x@h/db", PoolConfig(statement_timeout=2.5))
    assert direct["connect_args"]["server_settings"]["statement_timeout"] == "2500"
    assert "statement_cache_size" not in direct["connect_args"]


async def test_statement_timeout_is_enforced(server_urls: tuple[str, str]) -> None:
    db = Database(server_urls[0], config=PoolConfig(min_size=0, statement_timeout=0.2))
    try:
        with pytest.raises(Exception, match="statement timeout"):
            async with db.session() as session:
                await session.execute(text("SELECT pg_sleep(2)"))
    finally:
        await db.close()


async def test_a_failed_commit_is_never_a_2xx(server_urls: tuple[str, str]) -> None:
    """The unit of work commits before the response: a commit-time error is a 5xx."""
    app = create_app(make_settings(*server_urls))

    @app.post("/t/deferred")
    async def deferred(session: SessionDep) -> dict[str, bool]:
        await session.execute(
            text(
                "CREATE TABLE IF NOT EXISTS uow_deferred (v int, CONSTRAINT uow_deferred_u "
                "UNIQUE (v) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
        # both inserts succeed; the unique check fires at COMMIT
        await session.execute(text("INSERT INTO uow_deferred VALUES (1), (1)"))
        return {"ok": True}

    async for client in app_client(app):
        response = await client.post("/t/deferred")
        assert response.status_code == 500, response.text
        assert response.headers["content-type"] == "application/problem+json"


async def test_a_commit_answered_with_rollback_is_never_a_2xx(server_urls: tuple[str, str]) -> None:
    """A handler that swallows a failed statement without a savepoint and carries on: its
    COMMIT comes back as ROLLBACK, nothing was written, so the answer is a 500, not 200."""
    app = create_app(make_settings(*server_urls))

    @app.post("/t/swallowed")
    async def swallowed(session: SessionDep) -> dict[str, bool]:
        await session.execute(text("CREATE TABLE IF NOT EXISTS uow_swallowed (v int)"))
        await session.execute(text("INSERT INTO uow_swallowed VALUES (1)"))
        with contextlib.suppress(DBAPIError):  # the bug: no savepoint, the transaction
            await session.execute(text("SELECT 1 / 0"))  # is aborted
        return {"credited": True}

    async for client in app_client(app):
        response = await client.post("/t/swallowed")
        assert response.status_code == 500, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "credited" not in response.text


def test_ensure_database_creates_a_missing_database_once(server_urls: tuple[str, str]) -> None:
    """`surge up` / `surge migrate` against a fresh external server: the named database is
    created, then found; an unreachable server is an error, not a silent pass."""
    url = make_url(server_urls[0]).set(database=f"surge_new_{uuid.uuid4().hex[:8]}")
    fresh = url.render_as_string(hide_password=False)
    try:
        assert migrate.ensure_database(fresh) is True
        assert migrate.ensure_database(fresh) is False
        assert migrate.pending_revisions(fresh)  # reachable, and empty of our schema
    finally:  # the server may be a shared one (SURGE_TEST_DATABASE_URL): leave it as found

        async def drop() -> None:
            admin = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
            async with admin.connect() as connection:
                await connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}"')
            await admin.dispose()

        asyncio.run(drop())
    unreachable = url.set(port=1).render_as_string(hide_password=False)
    with pytest.raises(ConnectionRefusedError):
        migrate.ensure_database(unreachable)


async def test_driver_fetch_runs_inside_the_unit_of_work(server_urls: tuple[str, str]) -> None:
    """``driver_fetch`` skips SQLAlchemy's statement path, not the transaction: its writes
    commit and roll back with the session's, it begins the transaction when it is the first
    statement, and its errors are the DBAPIError a ``session.execute`` would raise."""
    db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=1))
    table = f"driver_fetch_{uuid.uuid4().hex[:8]}"
    try:
        async with db.session() as session:
            await session.execute(text(f"CREATE TABLE {table} (v int PRIMARY KEY)"))

        # First statement of its unit of work, then rolled back: nothing stays.
        async def first_then_rolled_back() -> None:
            async with db.session() as session:
                rows = await driver_fetch(
                    session, f"INSERT INTO {table} VALUES ($1) RETURNING v, txid_current()", 1
                )
                assert rows[0][0] == 1
                # Same transaction as a statement sent the ordinary way after it.
                same = await session.scalar(text("SELECT txid_current()"))
                assert same == rows[0][1]
                raise RuntimeError("roll back")

        with pytest.raises(RuntimeError):
            await first_then_rolled_back()
        async with db.session() as session:
            await session.execute(text(f"INSERT INTO {table} VALUES (2)"))
            await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 3)
        async with db.session() as session:
            values = (await session.execute(text(f"SELECT v FROM {table} ORDER BY v"))).scalars()
            assert list(values) == [2, 3]
            with pytest.raises(DBAPIError) as caught:
                await driver_fetch(session, f"INSERT INTO {table} VALUES ($1)", 2)
            assert sqlstate(caught.value) == "23505"
            await session.rollback()

        # A connection killed under the unit of work is invalidated, never pooled again.
        async def killed_under_the_unit_of_work() -> None:
            async with db.session() as session:
                pid = await session.scalar(text("SELECT pg_backend_pid()"))
                killer = await asyncpg_connect(db.primary)
                try:
                    await killer.execute("SELECT pg_terminate_backend($1)", pid)
                finally:
                    await killer.close()
                await driver_fetch(session, "SELECT 1")

        with pytest.raises(DBAPIError) as lost:
            await killed_under_the_unit_of_work()
        assert lost.value.connection_invalidated
        assert is_unavailable(lost.value)
        async with db.session() as session:
            assert await session.scalar(text("SELECT 1")) == 1
            await session.execute(text(f"DROP TABLE {table}"))
    finally:
        await db.close()


@pytest.mark.parametrize("pgbouncer", [False, True])
async def test_one_statement_fast_paths_know_when_they_sit_behind_pgbouncer(
    server_urls: tuple[str, str], pgbouncer: bool
) -> None:
    """Behind PgBouncer's transaction mode a statement outside a transaction may be parsed on
    one server connection and executed on another: there the autocommit fast paths (the
    ledger's ``autocommit_fetch``, the job engine's ``pooled``) pin theirs with a
    transaction. This runs both paths in both modes against PostgreSQL (that they pin to one
    server behind a real PgBouncer is what ``make cluster-test`` exercises)."""
    from surge.kit.db import autocommit_fetch, behind_pooler
    from surge.kit.jobs import _driver

    db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=1, pgbouncer=pgbouncer))
    try:
        async with db.primary.connect() as connection:
            raw = await connection.get_raw_connection()
            assert behind_pooler(raw.driver_connection) is pgbouncer
        [row] = await autocommit_fetch(db.primary, "SELECT $1::int + 1", 41)
        assert row[0] == 42
        assert await _driver.pooled(db.primary, "SELECT $1::int * 2", (21,)) == 42
        with pytest.raises(DBAPIError):  # errors surface as on the SQLAlchemy path
            await _driver.pooled(db.primary, "SELECT 1/0", ())
        # and the connection is still usable afterwards (no transaction left open)
        assert await _driver.pooled(db.primary, "SELECT 7", ()) == 7
    finally:
        await db.close()
