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

import contextlib
import socket
import struct
import types
from collections.abc import Generator
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


#: Linux's option to hold a socket's writes until released (absent elsewhere: no corking).
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)


def _cork(transport: Any) -> Any:
    """Hold what is written on ``transport`` in the kernel until ``_uncork``: the BEGIN then
    leaves in one TCP segment with the statement asyncpg writes next — one wake-up of the
    server instead of two. Returns the socket to release, or ``None`` when there is nothing
    to cork (a Unix socket, another system): the writes then leave one by one, as before."""
    sock = transport.get_extra_info("socket")
    if _TCP_CORK is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
    except OSError:
        return None
    return sock


def _uncork(sock: Any) -> None:
    with contextlib.suppress(OSError):  # the connection is gone: nothing is left to send
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)


@types.coroutine
def _rest_of(coroutine: Any, yielded: Any) -> Generator[Any, Any, Any]:
    """Await what is left of ``coroutine`` after its first step yielded ``yielded``: what
    ``yield from`` does (values, errors and cancellation passed through unchanged)."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as error:
            try:
                yielded = coroutine.throw(error)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coroutine.send(sent)
            except StopIteration as stop:
                return stop.value


async def _written_then_awaited(coroutine: Any, sock: Any) -> Any:
    """Run ``coroutine``'s first step now — asyncpg writes its messages there, before its
    first wait — release the cork, then await the rest. The cork is released whatever the
    first step does (an argument that cannot be encoded raises before writing)."""
    try:
        yielded = coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    finally:
        if sock is not None:
            _uncork(sock)
    return await _rest_of(coroutine, yielded)


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
        sock = _cork(driver._transport)
        driver._transport.write(begin)
        driver._top_xact = transaction
        transaction._state = TransactionState.STARTED
        adapted._transaction = transaction
        try:
            records: list[Any] = await _written_then_awaited(
                driver._protocol.bind_execute(prepared, args, "", 0, False, None), sock
            )
        except Exception as error:
            if driver._protocol.is_in_transaction():
                raise  # the server answered: its transaction is open (or failed), tracked
            raise Desynchronized() from error
        # A cancellation (``BaseException``) passes through: asyncpg sends its cancel
        # request and reads this batch's answers up to its ReadyForQuery before the next
        # operation, so the tracked transaction is then rolled back normally.
    return records
