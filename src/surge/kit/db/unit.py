"""A unit of work that holds its pooled connection without SQLAlchemy's session shell
(ADR 0057).

``Session.connection()`` builds, per unit of work, a ``SessionTransaction``, an engine
``Connection`` and its ``RootTransaction`` around the pool's checkout, and ``Session.close()``
takes them apart again (expunge, the transaction's close, the connection's rollback of a
transaction already committed, the return to the pool), each behind a greenlet hop. For a
unit of work whose statements all go to the driver (a stored-function call, an enqueue) none of
it is used: it was about half of such a unit of work's client CPU.

So the sessions of ``Database.session()`` are ``UnitOfWorkSession``\\ s. Their first driver
statement checks the connection out of the pool itself (``hold``: the pool's own checkout,
``Engine.raw_connection()``) and keeps it on the session. The moment anything goes through
SQLAlchemy in the same unit of work (an ORM query, a flush, ``session.execute``,
``session.connection()``), ``get_bind`` hands SQLAlchemy an engine ``Connection`` wrapped
around that same pooled connection ("adoption"): one connection, one transaction, the one
SQLAlchemy would have used, with the driver's BEGIN already sent; SQLAlchemy then commits
and rolls back as usual. Without adoption the unit of work commits with the driver's
COMMIT (``commit_held``) and gives the connection back with the pool's own check-in
(``release``), whose reset-on-return rolls back whatever is still open — the rollback of a
failed, cancelled or abandoned unit of work, exactly what the pool does for any connection
returned inside a transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import _SessionCloseState
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from surge.kit.db.hop import hop
from surge.kit.db.pool import IdleTimeoutPool


class UnitOfWorkSession(Session):
    """The session of ``Database.session()``: a ``Session`` that may hold a pooled connection
    its driver statements checked out (``_surge_held``) and that SQLAlchemy adopts, wrapped
    in an engine ``Connection`` (``_surge_adopted``), when it needs one."""

    _surge_held: PoolProxiedConnection | None = None
    _surge_adopted: Connection | None = None

    def get_bind(self, mapper: Any = None, **kw: Any) -> Engine | Connection:
        held = self._surge_held
        if held is None or kw.get("bind") is not None:
            return super().get_bind(mapper, **kw)
        adopted = self._surge_adopted
        if adopted is None:
            engine = self.bind
            assert isinstance(engine, Engine)
            # No I/O: the pooled connection is already checked out and its transaction (if
            # a statement began one) is the adapter's; the Connection's begin() sends nothing.
            adopted = self._surge_adopted = Connection(engine, connection=held)
        return adopted

    def rollback(self) -> None:
        """``Session.rollback()``, the held connection's transaction included (SQLAlchemy
        knows nothing of it until it adopts the connection)."""
        held = self._surge_held
        if held is not None and not sqlalchemy_holds(self) and held.is_valid:
            adapted: Any = held.dbapi_connection
            try:
                adapted.rollback()  # ROLLBACK when a transaction is open, else nothing
            except Exception as error:
                dialect = self.bind.dialect  # type: ignore[union-attr]
                lost = bool(dialect.is_disconnect(error, adapted, None))  # type: ignore[arg-type]
                if lost:
                    held.invalidate(error)
                raise exc.DBAPIError.instance(
                    "ROLLBACK", [], error, dialect.loaded_dbapi.Error,
                    connection_invalidated=lost, dialect=dialect,
                ) from error  # fmt: skip
        super().rollback()

    def _close_impl(self, invalidate: bool, is_reset: bool = False) -> None:
        """``close()``, ``reset()`` and ``invalidate()``: the held connection goes back to the
        pool (the pool's reset rolls back what is open) or is invalidated, as SQLAlchemy
        does with the connections it checked out itself."""
        held, adopted = self._surge_held, self._surge_adopted
        self._surge_held = self._surge_adopted = None
        try:
            # Nothing to take apart when SQLAlchemy began nothing and holds no object (the
            # held path): the base class would only swap in an empty identity map.
            if (
                self._transaction is not None
                or self.identity_map
                or self._new
                or self._close_state is _SessionCloseState.ACTIVE
            ):
                super()._close_impl(invalidate, is_reset)
        finally:
            if adopted is not None:
                adopted.close()
            elif held is not None:
                if invalidate and held.is_valid:
                    held.invalidate()
                held.close()


def sqlalchemy_holds(session: UnitOfWorkSession) -> bool:
    """Whether SQLAlchemy's session transaction took the held connection over (it then
    commits and rolls it back). ``get_bind()`` alone hands out the adopted ``Connection``
    without beginning anything on it (``ledger.system_account`` reads the engine from it):
    the held transaction is then still the driver's alone, and the unit of work commits or
    rolls it back itself — otherwise SQLAlchemy would commit an empty session transaction
    and the pool's check-in would roll the driver's writes back (ADR 0063)."""
    adopted, transaction = session._surge_adopted, session._transaction
    if adopted is None or transaction is None:
        return False
    while transaction._parent is not None:
        transaction = transaction._parent
    return adopted in transaction._connections


def _plain(session: Session, engine: Engine) -> bool:
    """Nothing listens to what the held path skips: the session's ``after_begin`` and the
    engine's transaction events (they keep SQLAlchemy's path). The session's commit events
    are checked at commit time (``commit_held``), where a listener added meanwhile counts."""
    dispatch = engine.dispatch
    return not (
        session.dispatch.after_begin or dispatch.begin or dispatch.commit or dispatch.rollback
    )


async def hold(session: AsyncSession) -> PoolProxiedConnection | None:
    """The pooled connection ``session``'s driver statement should run on, checked out now
    if this is the unit of work's first one; ``None`` when SQLAlchemy already holds (or must
    hold) the connection: the caller then goes through ``session.connection()``."""
    sync = session.sync_session
    if not isinstance(sync, UnitOfWorkSession) or sync._surge_adopted is not None:
        return None
    held = sync._surge_held
    if held is None:
        engine = sync.bind
        if sync._transaction is not None or not isinstance(engine, Engine):
            return None
        if not _plain(sync, engine):
            return None
        # A connection an earlier unit of work parked (ADR 0064): still checked out, outside
        # any transaction; else the pool's own checkout (waits for a free connection, opens
        # or recycles one, as for any engine connection), on a reused greenlet (``hop``).
        pool = engine.pool
        held = pool.take_parked() if isinstance(pool, IdleTimeoutPool) else None
        if held is None:
            held = await hop(engine.raw_connection)
        sync._surge_held = held
    if not held.is_valid:  # a statement lost it earlier in this unit of work
        raise exc.PendingRollbackError(
            "the unit of work's connection was invalidated; roll it back", code="8s2b"
        )
    return held


def held_engine(session: AsyncSession) -> Engine:
    engine = session.sync_session.bind
    assert isinstance(engine, Engine)
    return engine


async def invalidate_held(held: PoolProxiedConnection, error: BaseException) -> None:
    """Invalidate a held connection that is gone (``Connection.invalidate``'s pool side);
    once only, as ``Connection.invalidate`` (a second call would warn)."""
    if held.is_valid:
        await greenlet_spawn(held.invalidate, error)


def is_held(session: AsyncSession) -> bool:
    """Whether ``session`` holds a connection whose transaction SQLAlchemy has not taken over."""
    sync = session.sync_session
    return (
        isinstance(sync, UnitOfWorkSession)
        and sync._surge_held is not None
        and not sqlalchemy_holds(sync)
    )


async def adopt(session: AsyncSession) -> None:
    """Hand the held connection to SQLAlchemy now (it will commit it)."""
    await greenlet_spawn(session.sync_session.connection)


def close_all(session: Session) -> None:
    """``Session.close()``: for a ``UnitOfWorkSession`` it also gives the held connection
    back, through the adopted ``Connection`` or the pool's check-in (``_close_impl``)."""
    session.close()


async def release(session: AsyncSession, *, committed: bool = False) -> None:
    """Close ``session`` and give its connection back to the pool (see ``close_all``);
    ``committed``: the unit of work's driver COMMIT (``commit_held``) just succeeded, so the
    connection it held may be parked for the next unit of work instead (``park``)."""
    sync = session.sync_session
    if committed and isinstance(sync, UnitOfWorkSession) and park(sync):
        return
    await hop(close_all, sync)


def park(session: UnitOfWorkSession) -> bool:
    """Park the connection ``session`` held for its driver statements alone, after their
    COMMIT succeeded, and return True; or return False, having done nothing, when the
    connection is not exactly what the pool's check-in would leave (ADR 0064): it must be
    valid; SQLAlchemy must never have touched it (no adopted ``Connection``, nothing for
    ``Session.close()`` to take apart); the adapter and asyncpg must both see no
    transaction, the protocol no transaction status other than idle, no cancellation whose
    answer is still due, and the connection open; the record no finalizer pending (an
    isolation level to restore). The pool then decides (``IdleTimeoutPool.park``: nobody
    waiting, nobody listening to check-in or check-out)."""
    held = session._surge_held
    if (
        held is None
        or session._surge_adopted is not None
        or session._transaction is not None
        or session.identity_map
        or session._new
        or session._close_state is _SessionCloseState.ACTIVE
        or not held.is_valid
    ):
        return False
    record: Any = held._connection_record
    adapted: Any = held.dbapi_connection
    driver = adapted._connection
    protocol = driver._protocol
    if (
        record is None
        or record.finalize_callback
        or adapted._transaction is not None
        or driver._top_xact is not None
        or driver.is_closed()
        or protocol.is_in_transaction()
        or protocol._is_cancelling()
    ):
        return False
    pool = held._pool
    if not isinstance(pool, IdleTimeoutPool) or not pool.park(held):
        return False
    session._surge_held = None
    return True
