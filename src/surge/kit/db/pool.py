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
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, PoolResetState
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
        event.listen(self, "checkin", _stamp_idle)
        event.listen(self, "reset", _end_untracked_transaction)

    def _do_get(self) -> ConnectionPoolEntry:
        if self._pool.qsize() == 0 and self._overflow >= self._max_overflow:
            self._waiting += 1
            try:
                return super()._do_get()
            finally:
                self._waiting -= 1
        return super()._do_get()

    def waiting(self) -> int:
        return self._waiting

    def exhausted(self) -> bool:
        """No idle connection and none may be opened: the next checkout waits."""
        return self._pool.qsize() == 0 and self._overflow >= self._max_overflow

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
        """Close connections idle for ``idle_timeout`` seconds, keeping ``min_size`` open."""
        stale = self._take_idle(idle_timeout)
        if stale:
            await greenlet_spawn(self._close_records, stale)
        return len(stale)


def _stamp_idle(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info[_IDLE_SINCE] = time.monotonic()


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
