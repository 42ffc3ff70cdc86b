"""A SQLAlchemy async pool with a floor and an idle timeout (seed 000: min 5, max 20, idle 30 s).

SQLAlchemy's ``QueuePool`` either keeps every connection it ever opened (``pool_size``) or closes
each overflow connection the moment it is returned (``max_overflow``), which under a steady
load above the floor reconnects on almost every request. What the seed asks for, and what
HikariCP and node-postgres do, is different: keep up to ``max`` open while they are used,
close the ones idle longer than ``idle_timeout``, never go below ``min``.

``IdleTimeoutPool`` is ``AsyncAdaptedQueuePool`` with ``pool_size = max``, ``max_overflow = 0``
and LIFO checkout (hot connections are reused, idle ones sink to the bottom), plus
``reap()``, called periodically, which closes idle connections down to the floor, and
``prewarm()``, which opens the floor at start-up.

It also keeps the connections that units of work *parked* (``park`` / ``take_parked``, ADR
0064): a connection whose unit of work held it for the driver alone and committed it cleanly
is kept checked out, in a small LIFO, for the next unit of work, instead of going through
the pool's check-in (reset, events, queue) and check-out (queue, record, fairy, events) and
the two greenlet hops around them. A parked connection counts as checked in (``checkedin``,
``checkedout``, ``exhausted``, the gauges); it goes back to the queue the moment anything
else needs one (``_do_get`` finds the queue empty), when its record is due for recycling or
was invalidated, when it has been parked for ``idle_timeout`` (``reap``), and at ``dispose``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import (
    AsyncAdaptedQueuePool,
    ConnectionPoolEntry,
    PoolProxiedConnection,
    PoolResetState,
)
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util.concurrency import await_

_IDLE_SINCE = "surge_idle_since"


class IdleTimeoutPool(AsyncAdaptedQueuePool):
    """See the module docstring. ``waiting()`` counts callers blocked on an empty pool."""

    def __init__(self, *args: Any, min_size: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("use_lifo", True)
        kwargs["max_overflow"] = 0
        super().__init__(*args, **kwargs)
        self.min_size = min_size
        self._waiting = 0
        #: Parked connections and when they were parked (``time.monotonic()``), most recent last.
        self._parked: list[tuple[PoolProxiedConnection, float]] = []
        event.listen(self, "reset", _end_untracked_transaction)

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()  # what the reaper measures idleness from
        super()._do_return_conn(record)

    def _do_get(self) -> ConnectionPoolEntry:
        if self._parked and self._pool.qsize() == 0:
            # Someone else needs a connection and the queue has none: a parked one is idle,
            # it goes back first (no caller ever waits, or opens one, while one is parked).
            self._unpark(0)
        if self._pool.qsize() == 0 and self._overflow >= self._max_overflow:
            self._waiting += 1
            try:
                return super()._do_get()
            finally:
                self._waiting -= 1
        return super()._do_get()

    def waiting(self) -> int:
        return self._waiting

    def checkedin(self) -> int:
        """Connections idle (in the queue or parked)."""
        return super().checkedin() + len(self._parked)

    def parked(self) -> int:
        return len(self._parked)

    def checkedout(self) -> int:
        """Connections in use (a parked one is idle: not counted)."""
        return super().checkedout() - len(self._parked)

    def exhausted(self) -> bool:
        """No idle connection and none may be opened: the next checkout waits."""
        return self._pool.qsize() == 0 and not self._parked and self._overflow >= self._max_overflow

    # ---- parked connections (ADR 0064) -----------------------------------------------------
    def parking(self) -> bool:
        """Whether a connection may be parked now: nobody waits for one, and nothing listens
        to the check-in or check-out a parked connection skips (only this pool's own reset
        listener, whose case a parked connection never is: see ``park``)."""
        dispatch = self.dispatch
        return (
            not self._waiting
            and len(self._parked) < self._pool.maxsize
            and not dispatch.checkin
            and not dispatch.checkout
            and len(dispatch.reset) == 1
        )

    def park(self, connection: PoolProxiedConnection) -> bool:
        """Keep ``connection`` checked out for the next ``take_parked`` and return True, or
        return False (the caller checks it in as usual). The caller vouches that the
        connection is exactly what the check-in would have left: outside any transaction,
        no statement in flight, nothing for the reset to do (``unit.park``)."""
        if not self.parking():
            return False
        self._parked.append((connection, time.monotonic()))
        return True

    def take_parked(self) -> PoolProxiedConnection | None:
        """The most recently parked connection, still checked out, or ``None``. One whose
        record the check-out would recycle (``pool_recycle`` age, the pool invalidated since
        it was opened, a soft invalidation) goes back to the queue instead, where the next
        check-out recycles it as it would have."""
        while self._parked:
            connection, _since = self._parked[-1]
            record: Any = connection._connection_record
            if record is not None and not self._due(record):
                self._parked.pop()
                return connection
            self._unpark(len(self._parked) - 1)
        return None

    def _due(self, record: Any) -> bool:
        """What ``_ConnectionRecord.get_connection`` checks at check-out."""
        started = record.starttime
        return bool(
            (self._recycle > -1 and time.time() - started > self._recycle)
            or self._invalidate_time > started
            or record._soft_invalidate_time > started
        )

    def _unpark(self, index: int) -> None:
        """Check the parked connection at ``index`` in, as its unit of work would have; its
        idle time counts from when it was parked. No I/O: a parked connection is outside any
        transaction, so the reset's rollback sends nothing."""
        connection, since = self._parked.pop(index)
        record: Any = connection._connection_record
        connection.close()
        if record is not None:
            record.info[_IDLE_SINCE] = since

    def unpark(self, older_than: float = 0.0) -> int:
        """Check in the connections parked for at least ``older_than`` seconds (all by
        default); return how many."""
        now, count = time.monotonic(), 0
        while self._parked and now - self._parked[0][1] >= older_than:
            self._unpark(0)
            count += 1
        return count

    def dispose(self) -> None:
        self.unpark()
        super().dispose()

    def opened(self) -> int:
        """Connections open right now (checked in + checked out)."""
        return self._pool.maxsize + self._overflow

    def _take_idle(self, idle_timeout: float) -> list[ConnectionPoolEntry]:
        """Remove from the queue the records idle longer than ``idle_timeout`` beyond the floor.

        Runs without awaiting, so no other task sees the queue half-drained.
        """
        excess = self.opened() - self.min_size
        if excess <= 0:
            return []
        now = time.monotonic()
        drained: list[ConnectionPoolEntry] = []
        while self._pool.qsize():
            drained.append(self._pool.get_nowait())
        stale: list[ConnectionPoolEntry] = []
        keep: list[ConnectionPoolEntry] = []
        # LIFO: drained[0] was on top (most recently used); the stalest are at the end.
        for record in reversed(drained):
            idle = now - record.info.get(_IDLE_SINCE, now) if record.info else 0.0
            if len(stale) < excess and idle >= idle_timeout:
                stale.append(record)
            else:
                keep.append(record)
        for record in keep:  # oldest first, so the most recent ends on top again
            self._pool.put_nowait(record)
        return stale

    def _close_records(self, records: list[ConnectionPoolEntry]) -> None:
        for record in records:
            try:
                record.close()
            finally:
                self._dec_overflow()

    async def reap(self, idle_timeout: float) -> int:
        """Close connections idle for ``idle_timeout`` seconds, keeping ``min_size`` open. The
        connections parked that long go back to the queue first (the oldest are at the
        bottom of the LIFO: under load only the top few are reused)."""
        if self._parked:
            await greenlet_spawn(self.unpark, idle_timeout)
        stale = self._take_idle(idle_timeout)
        if stale:
            await greenlet_spawn(self._close_records, stale)
        return len(stale)


def _end_untracked_transaction(
    dbapi_connection: Any, _record: ConnectionPoolEntry, state: PoolResetState
) -> None:
    """The pool's reset, before its ROLLBACK: end a transaction the adapter does not track.

    SQLAlchemy's asyncpg adapter records a transaction only once its BEGIN has *returned*,
    and forgets it as soon as a ROLLBACK was *attempted*. A task cancelled while either was
    on the wire leaves asyncpg's connection inside the transaction (or with a stale
    "in transaction" status until the cancelled answer is read), the reset's ROLLBACK sends
    nothing, and every later unit of work on that connection failed with "cannot use
    Connection.transaction() in a manually started transaction" — a pooled connection
    poisoned for good (seen once in ~900 tests; about 1 in 600 random cancellations,
    ``tests/kit/test_db_pool_reset.py``; the same family as SQLAlchemy issue 13381 and
    sqlx issue 4393). Here the ROLLBACK is sent through the driver,
    which first waits for the cancelled statement's answer (a ROLLBACK outside a
    transaction only draws a warning). A connection that cannot take it raises, and
    SQLAlchemy closes it instead of pooling it."""
    if not state.asyncio_safe or getattr(dbapi_connection, "_transaction", None) is not None:
        return  # tracked: the reset's own ROLLBACK ends it
    driver: Any = getattr(dbapi_connection, "_connection", None)
    if driver is None or (driver._top_xact is None and not driver.is_in_transaction()):
        return
    driver._top_xact = None
    await_(driver.execute("ROLLBACK"))


async def asyncpg_connect(engine: AsyncEngine) -> Any:
    """A raw asyncpg connection to ``engine``'s database, outside its pool (caller closes)."""
    import asyncpg  # type: ignore[import-untyped]

    url = engine.url
    return await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password,
        database=url.database, timeout=5,
    )  # fmt: skip


async def prewarm(engine: AsyncEngine, count: int) -> None:
    """Open ``count`` connections concurrently and return them to the pool."""
    if count <= 0:
        return
    connections = await asyncio.gather(*(engine.connect() for _ in range(count)))
    for connection in connections:
        await connection.close()
