"""A unit of work's COMMIT sent straight through the driver when SQLAlchemy has nothing to
do at commit time (ADR 0047).

``Session.commit()`` does three things: flush what the ORM has pending, fire the session's
and the connection's commit events, and have the adapter send ``COMMIT`` — the last from
inside SQLAlchemy's greenlet, which must suspend (``await_``) for the round trip. That
suspension, and the commit bookkeeping around it, cost ~60 µs of Python per unit of work
on this machine, a fifth of a ledger transfer's client CPU. When there is nothing to flush
and nobody listens to the commit events, only the ``COMMIT`` itself is left to do, so it
is sent from here, on the connection the unit of work holds, and SQLAlchemy is then told
what the adapter's own ``commit()`` would have told it (the adapter's transaction is
over); ``Session.close()`` returns the connection to the pool as after any commit.

A COMMIT that PostgreSQL answers with the command tag ``ROLLBACK`` (the transaction had
failed: a statement raised and the caller carried on without a savepoint) is an error too,
on both paths: ``CheckedConnection`` (the driver's connection class) raises
``CommitRolledBack`` for it, so nobody answers 2xx for a write that was thrown away.

Errors are SQLAlchemy's: a refused COMMIT (a deferred constraint, a serialization failure)
raises the same ``DBAPIError`` with its SQLSTATE, and a connection lost on the way is
invalidated, so ``is_unavailable`` maps it to 503 and the pool never hands it out again.
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from asyncpg.exceptions import InFailedSQLTransactionError  # type: ignore[import-untyped]
from asyncpg.transaction import TransactionState  # type: ignore[import-untyped]
from sqlalchemy import exc
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection

from surge.kit.db.unit import (
    UnitOfWorkSession,
    adopt,
    held_engine,
    invalidate_held,
    sqlalchemy_holds,
)


class CommitRolledBack(InFailedSQLTransactionError):  # type: ignore[misc]
    """A ``COMMIT`` the server answered with the command tag ``ROLLBACK``: the transaction
    had already failed (SQLSTATE 25P02), nothing of it was written. PostgreSQL reports this
    as a success; the driver's ``Transaction.commit()`` drops the tag, so without this check
    the caller would acknowledge writes that were rolled back."""


#: The statements that end a transaction by committing it (``Transaction.commit()`` sends
#: ``COMMIT;``); compared upper-cased without the trailing semicolon and spaces.
_COMMITS = frozenset({"COMMIT", "END", "COMMIT TRANSACTION", "COMMIT WORK", "END TRANSACTION"})


class CheckedConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, whose ``execute`` refuses a COMMIT answered with ``ROLLBACK``.

    Every commit goes through here: SQLAlchemy's adapter and ``commit_through_driver`` both
    call asyncpg's ``Transaction.commit()``, which sends ``COMMIT;`` with ``execute`` and
    discards the command tag it returns. The protocol's own transaction status (``E``, a
    failed transaction) is not visible from Python; the tag is. Cost: one string comparison
    per ``execute`` (a plain statement; queries with results go through ``fetch``)."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        status: str = await super().execute(query, *args, timeout=timeout)
        if status == "ROLLBACK" and query.strip().rstrip(";").strip().upper() in _COMMITS:
            raise CommitRolledBack(
                "COMMIT was answered with ROLLBACK: the transaction had failed, nothing of it "
                "was written"
            )
        return status


async def as_dbapi_error(
    connection: AsyncConnection | PoolProxiedConnection,
    adapted: Any,
    statement: str,
    args: Any,
    error: Exception,
    *,
    dialect: Dialect | None = None,
) -> BaseException:
    """``error`` as ``Connection._handle_dbapi_exception`` would raise it: the adapter's
    translation of asyncpg's error, wrapped in ``DBAPIError``; a connection that is gone
    is invalidated first (``connection_invalidated`` says so). ``connection`` is an engine
    connection, or the pooled connection a unit of work holds (``unit``; give ``dialect``)."""
    if isinstance(connection, AsyncConnection):
        dialect = connection.dialect
    assert dialect is not None
    dbapi_error: BaseException = error
    if not isinstance(error, dialect.loaded_dbapi.Error):
        try:
            adapted._handle_exception(error)  # translates asyncpg's error, always raises
        except Exception as translated:
            dbapi_error = translated
    disconnect = bool(dialect.is_disconnect(dbapi_error, adapted, None))  # type: ignore[arg-type]
    if disconnect:
        with contextlib.suppress(Exception):
            if isinstance(connection, AsyncConnection):
                await connection.invalidate(dbapi_error)
            else:
                await invalidate_held(connection, dbapi_error)
    return exc.DBAPIError.instance(
        statement, args, dbapi_error, dialect.loaded_dbapi.Error,
        connection_invalidated=disconnect, dialect=dialect,
    )  # fmt: skip


def _driver_of(session: AsyncSession) -> Any:
    """The adapted asyncpg connection whose COMMIT would be the whole of ``session``'s
    commit, or ``None`` when SQLAlchemy has work to do there (or the shape is unusual):
    ORM changes to flush, a commit listener on the session or the connection, a savepoint
    still open, more than one connection, a transaction no longer active."""
    sync = session.sync_session
    transaction = sync._transaction
    if (
        transaction is None
        or transaction._parent is not None  # a savepoint still open: SQLAlchemy's way
        or not transaction.is_active
        or not sync._is_clean()  # something to flush
        or sync.dispatch.before_commit
        or sync.dispatch.after_commit
    ):
        return None
    held = set(transaction._connections.values())  # keyed by engine and by connection
    if len(held) != 1:
        return None
    ((connection, root, _should_commit, _autoclose),) = held
    if (
        connection.invalidated
        or root is None
        or not root.is_active
        or root is not connection._transaction  # a nested Connection-level transaction
        or connection.dispatch.commit
        or connection.engine.dispatch.commit
    ):
        return None
    return connection.connection.dbapi_connection


async def _driver_commit(adapted: Any) -> None:
    """The adapter's ``commit()`` without its greenlet: asyncpg's COMMIT under the adapter's
    mutex; the adapter's transaction is dropped once the COMMIT was attempted, whatever its
    outcome (the server ends a transaction whose COMMIT fails). A caller cancelled before
    the COMMIT left keeps it, so the close rolls it back."""
    async with adapted._execute_mutex:
        transaction = adapted._transaction
        if transaction is None:  # no statement began one on the server: nothing to end
            return
        try:
            await _commit(adapted._connection, transaction)
        finally:
            adapted._transaction = None


async def _commit(driver: Any, transaction: Any) -> None:
    """``transaction.commit()`` — asyncpg's ``Transaction.commit`` → ``execute("COMMIT;")``
    → ``CheckedConnection.execute`` — in one step where nothing else would have happened
    on the way (ADR 0064): a top-level transaction this unit of work started and asyncpg
    tracks, a ``CheckedConnection``, no query logger. The same message (``COMMIT;`` as a
    simple query), the same state changes (``_top_xact`` cleared first, the transaction
    COMMITTED, or FAILED when the COMMIT raised or was answered ``ROLLBACK``), the same
    errors. Anything else goes through ``transaction.commit()``."""
    if (
        transaction._state is not TransactionState.STARTED
        or transaction._nested
        or transaction._managed
        or driver._top_xact is not transaction
        or driver._query_loggers
        or not isinstance(driver, CheckedConnection)
    ):
        await transaction.commit()
        return
    driver._check_open()
    driver._top_xact = None
    try:
        status = await driver._protocol.query("COMMIT;", None)
        if status == "ROLLBACK":
            raise CommitRolledBack(
                "COMMIT was answered with ROLLBACK: the transaction had failed, nothing of it "
                "was written"
            )
    except BaseException:
        transaction._state = TransactionState.FAILED
        raise
    transaction._state = TransactionState.COMMITTED


async def commit_held(session: AsyncSession) -> bool:
    """Commit the connection ``session`` holds for its driver statements (``unit``) and
    return True; or return False when SQLAlchemy commits: nothing held, held but taken over
    by SQLAlchemy's session transaction (a bare ``get_bind()`` does not count),
    or SQLAlchemy has work to do at commit time (ORM changes to flush, a commit listener
    on the session) — then it adopts the held connection first, so its flush and COMMIT
    run in the same transaction. Raises what ``Session.commit()`` would."""
    sync = session.sync_session
    if not isinstance(sync, UnitOfWorkSession):
        return False
    held = sync._surge_held
    if held is None or sqlalchemy_holds(sync):
        return False
    if (
        sync._transaction is not None
        or not sync._is_clean()
        or sync.dispatch.before_commit
        or sync.dispatch.after_commit
    ):
        await adopt(session)
        return False
    if not held.is_valid:
        raise exc.PendingRollbackError(
            "the unit of work's connection was invalidated; roll it back", code="8s2b"
        )
    adapted = held.dbapi_connection
    try:
        await _driver_commit(adapted)
    except Exception as error:
        raise await as_dbapi_error(
            held, adapted, "COMMIT", (), error, dialect=held_engine(session).dialect
        ) from error
    return True


async def commit_through_driver(session: AsyncSession) -> bool:
    """Commit ``session``'s transaction with the driver's ``COMMIT`` and return True, or
    return False, having done nothing, when ``Session.commit()`` must do it (see
    ``_driver_of``). Either way the caller then closes the session; after True its close
    only returns the connection (the adapter has no transaction left to roll back).

    A failure raises the ``DBAPIError`` ``Session.commit()`` would have raised. The
    adapter's transaction is dropped once the COMMIT was attempted, whatever its outcome
    (what its ``commit()`` does): the server ends a transaction whose COMMIT fails. A
    caller cancelled before the COMMIT left keeps it, so the close rolls it back."""
    adapted = _driver_of(session)
    if adapted is None:
        return False
    try:
        await _driver_commit(adapted)
    except Exception as error:
        connection = await session.connection()
        raise await as_dbapi_error(connection, adapted, "COMMIT", (), error) from error
    return True


def nothing_to_commit(session: Session) -> bool:
    """Whether ``Session.commit()`` would do nothing but fire its own events: no statement
    began a transaction (on the driver's connection either: ``commit_held`` ran first), no
    ORM change to flush, nobody listening to the commit or to the session transaction it
    would begin and end. A unit of work that issued nothing (a request answered from a cache
    through a route that takes a session) then only closes its session (ADR 0063): ~65 µs of
    client CPU otherwise, to begin and commit an empty session transaction in a new greenlet."""
    if session._transaction is not None or not session._is_clean():
        return False
    dispatch = session.dispatch
    return not (
        dispatch.before_commit
        or dispatch.after_commit
        or dispatch.after_transaction_create
        or dispatch.after_transaction_end
    )
