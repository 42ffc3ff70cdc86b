"""BEGIN pipelined with a unit of work's first statement: one round trip instead of two
(ADR 0030).

asyncpg sends ``Transaction.start()``'s BEGIN as a simple query and waits for its answer
before the first statement can leave; it has no pipeline mode. PostgreSQL's extended
protocol does not need the wait: a BEGIN sent as Parse/Bind/Execute *without* a Sync,
followed by the statement's own Bind/Execute/Sync, runs as one batch, and the BEGIN turns
the batch's implicit transaction into the ordinary transaction block the unit of work then
commits or rolls back (what libpq's pipeline mode does). The server answers ParseComplete,
BindComplete and CommandComplete for the BEGIN ahead of the statement's own messages;
asyncpg's ``bind_execute`` state already ignores the first two, takes the CommandComplete
as a status that the statement's own one overwrites, and ends at the single ReadyForQuery
(``test_pipelined_begin_*`` in ``tests/kit/test_db_pipeline.py`` fail if asyncpg changes
that; asyncpg is pinned).

Used only when it is exactly equivalent to what ``_start_transaction`` would have done: the
adapter's default isolation (READ COMMITTED, not read-only, not deferrable), asyncpg's
statement cache on (not behind PgBouncer) and the statement already prepared under a name.
Otherwise the caller is told to begin the ordinary way.
"""

from __future__ import annotations

import struct
from typing import Any

from asyncpg.transaction import TransactionState  # type: ignore[import-untyped]


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _begin_messages(query: str) -> bytes:
    """Parse (unnamed statement, no parameter types), Bind (unnamed portal, no parameters,
    no result formats) and Execute (no row limit) of ``query``; no Sync."""
    return (
        _message(b"P", b"\0" + query.encode() + b"\0" + b"\0\0")
        + _message(b"B", b"\0\0" + b"\0\0" * 3)
        + _message(b"E", b"\0" + b"\0\0\0\0")
    )


#: The adapter's ``isolation_level`` → the BEGIN asyncpg's ``Transaction.start`` would send.
_BEGINS = {
    None: _begin_messages("BEGIN;"),
    "read_committed": _begin_messages("BEGIN ISOLATION LEVEL READ COMMITTED;"),
}


class Desynchronized(Exception):
    """The BEGIN left but no answer came back (the statement's arguments could not be
    encoded, so nothing followed it, or the connection broke): the connection's protocol
    state is unknown and it must be discarded. ``__cause__`` is the error to raise."""


async def begin_and_fetch(adapted: Any, statement: str, args: tuple[Any, ...]) -> list[Any] | None:
    """Open ``adapted``'s transaction with ``statement`` in one round trip and return its
    records, or ``None`` when pipelining does not apply (nothing was sent: begin the usual
    way). The caller holds ``adapted._execute_mutex`` and ``adapted._transaction is None``.

    From the moment the BEGIN is written the transaction is tracked exactly as
    ``_start_transaction`` tracks it, so the unit of work's COMMIT or ROLLBACK ends it
    whether the statement succeeds or fails on the server."""
    begin = _BEGINS.get(adapted.isolation_level)
    driver = adapted._connection
    if (
        begin is None
        or adapted.readonly
        or adapted.deferrable
        or driver._top_xact is not None
        or driver._protocol.is_in_transaction()
        or driver._protocol._is_cancelling()  # a cancelled call's answer is still due
        or driver._stmt_cache.get_max_size() == 0  # PgBouncer: see ``behind_pooler``
    ):
        return None
    prepared = await driver._get_statement(statement, None)  # cached: no round trip
    if not prepared.name or not prepared.prepared:
        return None
    transaction = driver.transaction(
        isolation=adapted.isolation_level, readonly=False, deferrable=False
    )
    with driver._stmt_exclusive_section:
        driver._check_open()
        driver._transport.write(begin)
        driver._top_xact = transaction
        transaction._state = TransactionState.STARTED
        adapted._transaction = transaction
        try:
            records: list[Any] = await driver._protocol.bind_execute(
                prepared, args, "", 0, False, None
            )
        except Exception as error:
            if driver._protocol.is_in_transaction():
                raise  # the server answered: its transaction is open (or failed), tracked
            raise Desynchronized() from error
        # A cancellation (``BaseException``) passes through: asyncpg sends its cancel
        # request and reads this batch's answers up to its ReadyForQuery before the next
        # operation, so the tracked transaction is then rolled back normally.
    return records
