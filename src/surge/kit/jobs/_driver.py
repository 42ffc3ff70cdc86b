"""The hot paths' way to PostgreSQL: prepared statements on the asyncpg connection under
SQLAlchemy (ADR 0025).

A ``session.execute(text(...))`` costs ~120 µs of Python per call before a byte is sent
(compiled-cache lookup, parameter processing, result metadata, two greenlet switches);
asyncpg's own ``fetch`` on the same connection costs a fifth of that and reuses its
prepared statement. The statements sent here are single, self-contained SQL statements: they
either ride in the caller's transaction (``in_transaction``) or run in autocommit on a pooled
connection (``pooled``), exactly where the SQLAlchemy call would have run them.

Errors are raised as SQLAlchemy's ``DBAPIError`` family, as ``session.execute`` would, so
``is_unavailable`` and the problem+json mapping see the same exceptions on both paths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import exc
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.util import greenlet_spawn

from surge.kit.db import behind_pooler, observe_statement

_CACHED = "surge.jobs.driver"


async def in_transaction(session: AsyncSession) -> Any | None:
    """The asyncpg connection carrying ``session``'s open transaction, or ``None`` when the
    transaction has not sent its BEGIN yet (SQLAlchemy begins lazily, at the first statement)
    or runs in autocommit: then the caller goes through ``session.execute``, which begins it.

    Cached per root transaction in ``session.info``: a later commit or rollback starts a new
    ``SessionTransaction``, which misses the cache and looks the connection up again."""
    transaction = session.sync_session.get_transaction()
    if transaction is None:
        return None
    cached = session.info.get(_CACHED)
    if cached is not None and cached[0] is transaction:
        return cached[1]
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if driver is None or not driver.is_in_transaction():
        return None
    session.info[_CACHED] = (transaction, driver)
    return driver


def translate(
    session: AsyncSession, statement: str, args: Sequence[Any], error: Exception
) -> Exception:
    """``error`` from ``in_transaction``'s driver, as ``session.execute`` would have raised it."""
    bind = session.bind
    return as_dbapi_error(bind.dialect, statement, args, error) if bind is not None else error


def as_dbapi_error(
    dialect: Dialect, statement: str, args: Sequence[Any], error: Exception
) -> Exception:
    if isinstance(error, exc.SQLAlchemyError):
        return error
    try:
        AsyncAdapt_asyncpg_connection._handle_exception_no_connection(dialect.loaded_dbapi, error)
    except Exception as translated:
        return exc.DBAPIError.instance(
            statement, list(args), translated, dialect.loaded_dbapi.Error, ismulti=False,
            connection_invalidated=dialect.is_disconnect(translated, None, None),  # type: ignore[arg-type]
        )  # fmt: skip
    return error


async def pooled(
    engine: AsyncEngine, statement: str, args: Sequence[Any], *, rows: bool = False
) -> Any:
    """Run ``statement`` on a pooled asyncpg connection outside any transaction (it commits
    alone): its first column of its first row, or every row with ``rows=True``.

    ``engine.raw_connection()`` skips the ``Connection`` object ``engine.connect()`` builds;
    the connection goes back to the pool as it came (no transaction was begun on it, so the
    pool's reset-on-return sends nothing). A connection that broke is invalidated, not
    returned to the pool. Counted by the slow-query log (``observe_statement``)."""
    raw = await engine.raw_connection()
    driver: Any = raw.driver_connection
    returned = False
    started = time.perf_counter()
    try:
        if behind_pooler(driver):  # PgBouncer: one statement, but pinned to one server
            async with driver.transaction():
                if rows:
                    return await driver.fetch(statement, *args)
                return await driver.fetchval(statement, *args)
        if rows:
            return await driver.fetch(statement, *args)
        return await driver.fetchval(statement, *args)
    except Exception as error:
        translated = as_dbapi_error(engine.dialect, statement, args, error)
        if driver.is_closed() or getattr(translated, "connection_invalidated", False):
            # What SQLAlchemy does on a disconnect: drop this connection and every one opened
            # before it (a restarted server closed them all), so no caller is handed one.
            returned = True
            await greenlet_spawn(engine.pool._invalidate, raw, error)
        raise translated from error
    finally:
        observe_statement(engine.sync_engine, statement, started)
        if not returned:
            await greenlet_spawn(raw.close)
