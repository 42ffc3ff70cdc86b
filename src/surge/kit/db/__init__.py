"""PostgreSQL: one pooled primary engine per process, optional read replicas, the unit of work.

- ``Database.session()``: one unit of work. Inner code flushes, never commits; the edge (the
  request dependency, the job runner) commits once, then runs the ``on_commit`` callbacks
  (cache invalidations, notifications) so nobody hears of a write that rolled back (ADR 0002).
- ``Database.read_session()``: read-only work, routed round-robin to a healthy replica when
  ``DATABASE_REPLICA_URLS`` is set; a replica that fails to connect is skipped for
  ``DB_REPLICA_RETRY`` and the read goes to the primary. Inside ``primary_reads()`` (every
  cache fill: ``kit.cache``) it reads the primary (ADR 0060).
- Pool: ``IdleTimeoutPool`` (max 20, floor 5, idle 30 s), gauges in ``/metrics``, slow
  queries logged and counted, connection loss mapped to 503 by ``is_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Engine, event, exc, text
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from surge.kit.db import replicas as routing
from surge.kit.db.commit import (
    CheckedConnection,
    as_dbapi_error,
    commit_held,
    commit_through_driver,
    nothing_to_commit,
)
from surge.kit.db.pipeline import Desynchronized, begin_and_fetch
from surge.kit.db.pool import IdleTimeoutPool, asyncpg_connect, prewarm
from surge.kit.db.replicas import primary_reads as primary_reads
from surge.kit.db.slowlog import _SLOW_LOGS, _SlowLog
from surge.kit.db.unit import (
    UnitOfWorkSession,
    close_all,
    held_engine,
    hold,
    invalidate_held,
    is_held,
    release,
)
from surge.kit.telemetry import metrics

log = structlog.get_logger()

OnCommit = Callable[[], Awaitable[None]]
_ON_COMMIT = "surge_on_commit"
_KEEP_ON_ERROR = "surge_keep_on_error"


@dataclass(frozen=True)
class PoolConfig:
    max_size: int = 20
    min_size: int = 5
    idle_timeout: float = 30.0
    checkout_timeout: float = 5.0
    connect_timeout: float = 5.0
    statement_timeout: float = 30.0
    slow_query: float = 0.5
    pgbouncer: bool = False
    replica_retry: float = 5.0
    application_name: str = "surge"
    #: Read-your-writes and replica lag (issue 18, ``surge.kit.db.replicas``).
    sticky_reads: float = 30.0
    replica_max_lag: int = 16 * 1024 * 1024
    replica_poll: float = 1.0


def engine_options(url: str, config: PoolConfig) -> dict[str, Any]:
    """The ``create_async_engine`` keyword arguments for one server (pure; tested by config)."""
    server_settings = {"application_name": config.application_name}
    connect_args: dict[str, Any] = {
        "timeout": config.connect_timeout,
        "command_timeout": None,
        "server_settings": server_settings,
        # COMMIT answered with ROLLBACK raises instead of passing for a success (commit.py).
        "connection_class": CheckedConnection,
    }
    if config.statement_timeout and not config.pgbouncer:
        server_settings["statement_timeout"] = str(int(config.statement_timeout * 1000))
    if config.pgbouncer:
        # PgBouncer in transaction mode hands each transaction any server connection, so a
        # statement prepared on one is unknown on the next: turn off asyncpg's statement
        # cache and SQLAlchemy's, and name statements uniquely (SQLAlchemy asyncpg docs).
        # Startup parameters other than a few are refused by PgBouncer, so statement_timeout
        # must be set on the role instead (ALTER ROLE ... SET statement_timeout).
        from uuid import uuid4

        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: f"__surge_{uuid4()}__"
    return {
        "poolclass": IdleTimeoutPool,
        "pool_size": config.max_size,
        "pool_timeout": config.checkout_timeout,
        "pool_recycle": 3600,
        "pool_pre_ping": False,  # a dead connection fails fast and is invalidated instead
        "connect_args": connect_args,
    }


#: Seconds between two samples of the pool gauges (size, checked out, waiting).
GAUGE_INTERVAL = 1.0

#: SQLSTATEs of a transaction that lost a race with another one (deadlock detected,
#: serialization failure, lock not available): nothing was written, the same request can
#: simply be sent again.
CONCURRENCY_SQLSTATES = frozenset({"40P01", "40001", "55P03"})
#: SQLSTATE of a statement cancelled by ``statement_timeout`` (or ``pg_cancel_backend``): the
#: database is too slow right now (a slow network, a hot row's lock queue), its transaction
#: rolled back whole; a transient condition (503 + Retry-After), not a bug (issue 20).
TIMEOUT_SQLSTATES = frozenset({"57014"})
#: SQLSTATEs of text PostgreSQL cannot store (a NUL character, a character outside the
#: database encoding): the caller's input, not a bug.
UNSTORABLE_TEXT_SQLSTATES = frozenset({"22021", "22P05"})
#: SQLSTATEs of a value that passed validation but cannot be stored: past BIGINT, a date
#: whose offset moves it out of range (asyncpg refuses to encode both: 22000), a numeric or
#: datetime overflow, text that is not the column's type.
OUT_OF_RANGE_SQLSTATES = frozenset({"22000", "22003", "22007", "22008", "22P02"})


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a SQLAlchemy-wrapped or bare asyncpg error, if it has one."""
    seen: BaseException | None = error
    for _ in range(4):  # SQLAlchemy error → adapter error → asyncpg error
        if seen is None:
            return None
        state = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(state, str):
            return state
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


def is_pool_exhausted(error: BaseException) -> bool:
    """True when ``error`` is a wait for a pooled connection that timed out: the process is
    busy (every connection in use), PostgreSQL is not down. Answer 503 + ``Retry-After``
    like an outage, but never report or alert it as "database down" (issue 19)."""
    return isinstance(error, exc.TimeoutError)


def is_unavailable(error: BaseException) -> bool:
    """True when ``error`` means PostgreSQL cannot be reached (→ 503), not a bad query."""
    if isinstance(error, exc.TimeoutError):  # pool exhausted
        return True
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        orig = getattr(error.orig, "__cause__", None) or error.orig
        name = type(orig).__name__
        return isinstance(orig, OSError | ConnectionError) or name in {
            "CannotConnectNowError",
            "ConnectionDoesNotExistError",
            "InterfaceError",
            "AdminShutdownError",
            "ConnectionFailureError",
            "TooManyConnectionsError",
        }
    return isinstance(error, OSError | ConnectionError | asyncio.TimeoutError)


#: Did this transaction write? (It has a transaction id only once it wrote something.)
_WROTE = text("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
# The insert position, not pg_current_wal_lsn() (the write position): with asynchronous
# commit the commit record can still sit in the WAL buffers after COMMIT returns, so the
# write position may not cover it yet, and a replica "caught up" to it may lack the write.
_LSN = text("SELECT pg_current_wal_insert_lsn()::text")


def observe_statement(engine: Engine | None, statement: str, started: float) -> None:
    """Count ``statement``, begun at ``perf_counter()`` value ``started``, in ``engine``'s
    slow-query log and metrics. For the statements sent to the driver directly (the fast
    paths), which SQLAlchemy's cursor events never see: a dictionary look-up and a clock
    read per statement. Failed statements count too (a statement cancelled by
    ``statement_timeout`` is the slowest kind)."""
    slow = _SLOW_LOGS.get(engine) if engine is not None else None
    if slow is not None:
        slow.observe(statement, started)


def sync_engine_of(session: AsyncSession) -> Engine | None:
    """The engine under ``session`` (bound to an engine or to one of its connections)."""
    bind: Any = session.sync_session.bind
    return bind if isinstance(bind, Engine) else getattr(bind, "engine", None)


def on_commit(session: AsyncSession, callback: OnCommit) -> None:
    """Run ``callback`` after ``session``'s unit of work commits (dropped on rollback)."""
    session.info.setdefault(_ON_COMMIT, []).append(callback)


async def driver_fetch(session: AsyncSession, statement: str, *args: Any) -> list[Any]:
    """Run ``statement`` (``$1``-style placeholders) on the driver connection under
    ``session``, inside its unit of work, and return asyncpg's records.

    For the hottest statements only (the ledger's function calls): it skips SQLAlchemy's
    per-statement machinery (compilation, execution context, result wrapping, the greenlet
    hop), which costs more Python per call than the driver's whole round trip (ADR 0024).
    The transaction is the session's own: if the unit of work has not sent its BEGIN yet,
    it goes out with this statement, in the same round trip (``pipeline``, ADR 0030), or,
    where that does not apply, first, exactly as the adapter's first ``execute`` would send
    it; the statement commits or rolls back with everything else. A failure is raised as
    the same ``sqlalchemy.exc.DBAPIError`` a ``session.execute`` would raise, and a
    connection that is gone is invalidated, so the pool never hands it out again. Counted
    by the slow-query log like any statement."""
    # The unit of work's own hold on its pooled connection when nothing went through
    # SQLAlchemy yet (ADR 0057), else the connection SQLAlchemy holds for the session.
    held = await hold(session)
    connection: AsyncConnection | PoolProxiedConnection
    if held is not None:
        connection, engine = held, held_engine(session)
        adapted: Any = held.dbapi_connection
    else:
        connection = await session.connection()
        sync = connection.sync_connection
        assert sync is not None  # a session's connection is always started
        adapted = sync.connection.dbapi_connection
        engine = sync.engine
    dialect = engine.dialect
    started = time.perf_counter()
    try:
        async with adapted._execute_mutex:
            if adapted._transaction is None:
                pipelined = await begin_and_fetch(adapted, statement, args)
                if pipelined is not None:
                    return pipelined
                await adapted._start_transaction()
            records: list[Any] = await adapted._connection.fetch(statement, *args)
            return records
    except Desynchronized as lost:
        # The caller gets the error the statement would have raised (a bad value stays a bad
        # value, a lost connection an outage); the connection is discarded either way.
        cause = lost.__cause__ if isinstance(lost.__cause__, Exception) else lost
        translated = await as_dbapi_error(
            connection, adapted, statement, args, cause, dialect=dialect
        )
        with contextlib.suppress(Exception):
            if isinstance(connection, AsyncConnection):
                await connection.invalidate(cause)
            else:
                await invalidate_held(connection, cause)
        raise translated from cause
    except Exception as error:
        raise await as_dbapi_error(
            connection, adapted, statement, args, error, dialect=dialect
        ) from error
    finally:
        observe_statement(engine, statement, started)


def behind_pooler(driver: Any) -> bool:
    """Whether ``driver`` (an asyncpg connection) was opened for PgBouncer's transaction mode
    (``DB_PGBOUNCER``: its statement cache is off, see ``engine_options``). There, a statement
    sent outside a transaction may be parsed on one server connection and executed on
    another (asyncpg issues 945/1058), so the one-statement fast paths wrap it in a
    transaction: two more round trips, only behind the pooler."""
    return bool(driver._stmt_cache.get_max_size() == 0)


async def autocommit_fetch(engine: AsyncEngine, statement: str, *args: Any) -> list[Any]:
    """Run ``statement`` alone, as a transaction of its own (no BEGIN, no COMMIT: one round
    trip), on a pooled connection's driver, and return asyncpg's records. Errors are raised
    like ``driver_fetch``'s; the connection goes back to the pool as it came (no transaction
    was opened on it), or is invalidated when it is gone."""
    async with engine.connect() as connection:
        sync = connection.sync_connection
        assert sync is not None
        adapted: Any = sync.connection.dbapi_connection
        driver = adapted._connection
        started = time.perf_counter()
        try:
            if behind_pooler(driver):
                async with driver.transaction():
                    pinned: list[Any] = await driver.fetch(statement, *args)
                return pinned
            records: list[Any] = await driver.fetch(statement, *args)
            return records
        except Exception as error:
            raise await as_dbapi_error(connection, adapted, statement, args, error) from error
        finally:
            observe_statement(engine.sync_engine, statement, started)


def keep_on_error(session: AsyncSession) -> None:
    """Commit ``session``'s unit of work even though the code about to raise fails it: for a
    write that *is* the answer to the failure (a security revocation behind a 401). The
    error still reaches the caller; ``on_commit`` callbacks run after that commit."""
    session.info[_KEEP_ON_ERROR] = True


class Database:
    """The process's engines and sessions. Create once, ``await start()``, ``await close()``."""

    def __init__(
        self, url: str, replica_urls: Sequence[str] = (), config: PoolConfig | None = None
    ) -> None:
        self.config = config or PoolConfig()
        self._gauge_updaters: list[Callable[[], None]] = []
        self.primary = self._engine(url, "primary")
        self.replicas = [self._engine(u, f"replica{i}") for i, u in enumerate(replica_urls)]
        self._replica_cycle = itertools.cycle(range(len(self.replicas))) if self.replicas else None
        self._replica_down_until = [0.0] * len(self.replicas)
        self.router = routing.ReplicaRouter(
            [f"replica{i}" for i in range(len(self.replicas))], max_lag=self.config.replica_max_lag
        )
        #: Where read-your-writes sticks live; the runtime swaps in ``RedisSticks``.
        self.sticks: routing.StickStore = routing.MemorySticks()
        self._sessions = async_sessionmaker(
            self.primary, expire_on_commit=False, sync_session_class=UnitOfWorkSession
        )
        self._tasks: list[asyncio.Task[None]] = []

    def _engine(self, url: str, name: str) -> AsyncEngine:
        engine = create_async_engine(url, **engine_options(url, self.config))
        pool = engine.pool
        assert isinstance(pool, IdleTimeoutPool)
        pool.min_size = self.config.min_size
        self._instrument(engine, name)
        return engine

    def _instrument(self, engine: AsyncEngine, name: str) -> None:
        slow = self.config.slow_query
        pool = engine.pool
        assert isinstance(pool, IdleTimeoutPool)
        size = metrics.DB_POOL_SIZE.labels(name)
        checked_out = metrics.DB_POOL_CHECKED_OUT.labels(name)
        waiting = metrics.DB_POOL_WAITING.labels(name)
        slow_counter = metrics.DB_SLOW_QUERIES.labels(name)

        def update_gauges(*_: Any) -> None:
            size.set(pool.opened())
            checked_out.set(pool.checkedout())
            waiting.set(pool.waiting())

        # Sampled, not updated on every checkout and checkin: three gauge writes (a lock
        # each, an mmap write each in multiprocess mode) on both edges of every unit of work
        # were a tenth of its Python cost (ADR 0024). Scrapes and the console sample every
        # second or slower; ``_gauges_forever`` refreshes at that rate, and the rare events
        # (a connection opened, closed, invalidated) still update at once.
        for name_ in ("connect", "close", "invalidate"):
            event.listen(pool, name_, update_gauges)
        self._gauge_updaters.append(update_gauges)

        slow_log = _SLOW_LOGS[engine.sync_engine] = _SlowLog(slow, slow_counter, name)

        def before(
            conn: Any, _cursor: Any, _stmt: str, _params: Any, ctx: Any, _many: bool
        ) -> None:
            ctx._surge_started = time.perf_counter()

        def after(
            conn: Any, _cursor: Any, statement: str, _params: Any, ctx: Any, _many: bool
        ) -> None:
            slow_log.observe(statement, ctx._surge_started)

        event.listen(engine.sync_engine, "before_cursor_execute", before)
        event.listen(engine.sync_engine, "after_cursor_execute", after)

    @property
    def engines(self) -> list[AsyncEngine]:
        return [self.primary, *self.replicas]

    async def start(self) -> None:
        """Open the floor of connections and start the idle reaper. Tolerates a DB that is down."""
        for engine in self.engines:
            try:
                await prewarm(engine, self.config.min_size)
            except Exception as error:
                log.warning("db.prewarm_failed", error=str(error))
        self._tasks.append(asyncio.create_task(self._reap_forever(), name="db-reaper"))
        self._tasks.append(asyncio.create_task(self._gauges_forever(), name="db-gauges"))
        if self.replicas:
            await self.poll_replicas()
            self._tasks.append(asyncio.create_task(self._poll_forever(), name="db-replicas"))

    async def poll_replicas(self) -> None:
        """Read the primary's WAL position and each replica's replay position (lag)."""

        async def position(engine: AsyncEngine, sql: str) -> int | None:
            try:
                async with asyncio.timeout(2), engine.connect() as connection:
                    return routing.parse_lsn((await connection.execute(text(sql))).scalar())
            except Exception:
                return None

        primary = await position(self.primary, "SELECT pg_current_wal_insert_lsn()::text")
        replays = [
            await position(engine, "SELECT pg_last_wal_replay_lsn()::text")
            for engine in self.replicas
        ]
        self.router.observe(primary, replays)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.replica_poll)
            try:
                await self.poll_replicas()
            except Exception:
                log.exception("db.replica_poll_failed")

    async def _gauges_forever(self) -> None:
        while True:
            for update in self._gauge_updaters:
                update()
            await asyncio.sleep(GAUGE_INTERVAL)

    async def _reap_forever(self) -> None:
        interval = max(0.2, min(self.config.idle_timeout / 3, 5.0))
        while True:
            await asyncio.sleep(interval)
            for engine in self.engines:
                pool = engine.pool
                assert isinstance(pool, IdleTimeoutPool)
                try:
                    closed = await pool.reap(self.config.idle_timeout)
                except Exception:
                    log.exception("db.reap_failed")
                    continue
                if closed:
                    log.debug("db.pool.reaped", closed=closed, open=pool.opened())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for engine in self.engines:
            await engine.dispose()

    # ---- units of work ------------------------------------------------------------------
    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One unit of work on the primary: commit at the end, roll back on any error."""
        session = self._sessions()
        closed = False
        reader = routing.current_reader() if self.replicas else None
        wrote = False
        try:
            try:
                yield session
                wrote = (
                    reader is not None
                    and self.config.sticky_reads > 0
                    and (session.in_transaction() or is_held(session))
                    and bool((await session.execute(_WROTE)).scalar())
                )
            except BaseException:
                if session.info.pop(_KEEP_ON_ERROR, False):
                    await _commit(session)
                    await run_on_commit(session)
                else:
                    await session.rollback()
                raise
            # A connection held by the unit of work's driver statements, never adopted by
            # SQLAlchemy (ADR 0057), or nothing for SQLAlchemy to do at commit time (no ORM
            # change to flush, no commit listener): COMMIT through the driver (ADR 0047),
            # then the close only returns the connection. A failed COMMIT raises here and
            # the ``finally`` closes. Otherwise COMMIT and the return to the pool in one hop
            # into SQLAlchemy's greenlet (ADR 0024); the close runs even when COMMIT fails.
            if await commit_held(session):
                # Committed cleanly through the driver: the connection may be parked for
                # the next unit of work (ADR 0064) rather than checked in.
                closed = True
                await release(session, committed=True)
            elif await commit_through_driver(session) or nothing_to_commit(session.sync_session):
                closed = True
                await release(session)
            else:
                closed = True
                await greenlet_spawn(_commit_and_close, session.sync_session)
        finally:
            if not closed:
                await asyncio.shield(release(session))
        if wrote and reader is not None:
            # After the commit (its LSN is what a replica must have replayed); the closed
            # session takes a connection for this one query and gives it back.
            await self._stick(session, reader)
        await run_on_commit(session)

    async def _stick(self, session: AsyncSession, reader: str) -> None:
        """After ``reader``'s write committed: its reads need the primary's WAL up to here."""
        try:
            lsn = routing.parse_lsn((await session.execute(_LSN)).scalar())
            await session.rollback()
            if lsn is not None:
                await self.sticks.put(reader, lsn, self.config.sticky_reads)
        except Exception as error:  # the write is committed; at worst a read is stale
            log.warning("db.stick_failed", error=str(error)[:200])

    @asynccontextmanager
    async def read_session(self) -> AsyncIterator[AsyncSession]:
        """A read-only session, on a healthy replica when there is one.

        In autocommit: each statement runs in its own implicit transaction, so a read costs
        its query alone instead of ``BEGIN``, the query and ``ROLLBACK`` — three round trips
        holding a pooled connection, which under ``surge load`` was a fifth of a web
        process's CPU (ADR 0015). Reads that need one snapshot across several statements
        use ``session()`` (or a REPEATABLE READ transaction of their own)."""
        connection = await self._read_connection()
        try:
            if not self.config.pgbouncer:
                # Behind PgBouncer's transaction pooling, autocommit lets asyncpg's Parse and
                # its Bind/Execute reach two different server connections ("prepared
                # statement does not exist", asyncpg issues 945/1058): there the read keeps
                # its transaction (BEGIN ... ROLLBACK), which pins one server connection.
                await connection.execution_options(isolation_level="AUTOCOMMIT")
            async with AsyncSession(bind=connection, expire_on_commit=False) as session:
                yield session
        finally:
            await connection.close()

    async def _read_connection(self) -> AsyncConnection:
        if self._replica_cycle is not None and not routing.reading_primary():
            now = time.monotonic()
            reader = routing.current_reader()
            need = await self.sticks.get(reader) if reader and self.config.sticky_reads else None
            # Behind PgBouncer's transaction pooling (and a balancer) the replica we checked
            # is not the one the next statement reaches: a stuck caller reads the primary.
            stuck_to_primary = need is not None and self.config.pgbouncer
            for index in [] if stuck_to_primary else self.router.candidates(need):
                if self._replica_down_until[index] > now:
                    continue
                try:
                    return await self.replicas[index].connect()
                except Exception as error:
                    if not is_unavailable(error):
                        raise
                    self._replica_down_until[index] = now + self.config.replica_retry
                    metrics.DB_REPLICA_FALLBACKS.inc()
                    log.warning("db.replica_down", replica=index, error=str(error)[:200])
            metrics.DB_REPLICA_FALLBACKS.inc()
        return await self.primary.connect()

    async def ping(self, engine: AsyncEngine | None = None) -> None:
        """``SELECT 1`` on ``engine`` (default: the primary). Raises when it cannot.

        When every pooled connection is in use, the ping opens its own connection outside
        the pool instead of queueing behind the requests: a busy pool is not a database
        that is down, and health (hence the health score and readiness) must not say so."""
        engine = engine or self.primary
        pool = engine.pool
        if isinstance(pool, IdleTimeoutPool) and pool.exhausted():
            connection = await asyncpg_connect(engine)
            try:
                await connection.execute("SELECT 1")
            finally:
                await connection.close()
            return
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))


async def _commit(session: AsyncSession) -> None:
    """Commit ``session``'s unit of work the cheapest way that is equivalent (see ``session``)."""
    if not await commit_held(session) and not await commit_through_driver(session):
        await session.commit()


def _commit_and_close(session: Session) -> None:
    try:
        session.commit()
    finally:
        close_all(session)


async def run_on_commit(session: AsyncSession) -> None:
    """Run ``session``'s ``on_commit`` callbacks, each whatever the others do. The write is
    committed: a failed side effect must not undo the reply, so its error is logged and
    counted (``db_on_commit_failures_total``), never raised. A callback whose effect must
    not be lost handles its own failure (the cache defers an invalidation it could not send,
    ``Cache.invalidate_on_commit``)."""
    callbacks: list[OnCommit] = session.info.pop(_ON_COMMIT, [])
    for callback in callbacks:
        try:
            await callback()
        except Exception:
            metrics.DB_ON_COMMIT_FAILURES.inc()
            log.exception("db.on_commit_failed", callback=getattr(callback, "__qualname__", "?"))
