"""Group commit for the send job's database steps (ADR 0026).

Every e-mail needs three short database steps around its SMTP conversation (ADR 0019):
read the row, mark it ``sending`` just before the end of DATA, record ``sent`` after the
reply. Done one message at a time they cost three round trips and two commits per e-mail
— more than the SMTP conversation itself on a small machine. The send jobs a worker runs
concurrently share them instead: each step is a *lane*; a job's request joins the lane's
queue, and one statement at a time serves everything queued (``WHERE id = ANY($1)``). No
timer: while a statement is in flight the next requests accumulate, so under load a
statement serves many jobs and when idle a job waits for nobody (group commit, as
PostgreSQL does for WAL flushes).

Each message keeps its own guarantee: its mark is committed before its own ``.`` is
written (the job awaits the lane's answer for its id), and a message the mark statement
did not return is not sent. What is shared is only the round trip and the commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar
from uuid import UUID

from surge.kit.runtime import Runtime
from surge.notifications import repository

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

EXTENSION = "notifications.coalescer"


class Lane(Generic[K, R]):
    """Requests for ``run`` served in groups: up to ``in_flight`` calls of ``run`` at a
    time (1 unless told), each fed with every key queued since the previous one started."""

    def __init__(
        self,
        run: Callable[[Sequence[K]], Awaitable[dict[K, R]]],
        default: R,
        *,
        exclusive: bool = False,
        in_flight: int = 1,
    ) -> None:
        self._run = run
        self._default = default
        #: Statements at most in flight at once (ADR 0055). A second one starts only while
        #: the first is on the wire, with what arrived since; what arrives while all are in
        #: flight waits for the first answer, and the next statement takes all of it.
        self._in_flight = max(1, in_flight)
        #: A drainer created but not yet running: it will take what is queued now.
        self._starting: asyncio.Task[None] | None = None
        #: A key asked twice in one batch: only its first request gets the answer, the
        #: others the default (a compare-and-set has one winner: two attempts of one message
        #: marked in the same statement must not both be told they own it).
        self._exclusive = exclusive
        self._queue: list[tuple[K, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0

    @property
    def waiting(self) -> int:
        """Requests queued for the next statement."""
        return len(self._queue)

    async def __call__(self, key: K) -> R:
        return await self.submit(key)

    def submit(self, key: K) -> asyncio.Future[R]:
        """Queue ``key`` and return its answer's future without waiting for it (a caller
        that has other work to do meanwhile, and awaits it later)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((key, future))
        if self._starting is None and len(self._tasks) < self._in_flight:
            task = self._starting = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._drained)
        return future

    def _drained(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._starting is task:  # cancelled before it ran: the next submit starts one
            self._starting = None

    async def _drain(self) -> None:
        self._starting = None
        while self._queue:
            batch, self._queue = self._queue, []
            self.batches += 1
            self.items += len(batch)
            try:
                found = await self._run(list(dict.fromkeys(key for key, _ in batch)))
            except BaseException as error:  # every waiter gets it (its job is retried)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(error, Exception):
                    raise
                continue
            answered: set[K] = set()
            for key, future in batch:
                if future.done():
                    continue
                if self._exclusive and key in answered:
                    future.set_result(self._default)
                    continue
                answered.add(key)
                future.set_result(found.get(key, self._default))


class Meeting(Generic[K, R]):
    """The requests of a group of concurrent conversations (a batch's *wave*, ADR 0040),
    handed to a lane together so that one statement serves them all.

    A member *joins* when it has a connection (a member still waiting for one holds nobody
    up), and then either *submits* its request or *leaves* without one. Held requests go to
    the lane the moment no joined member is left to wait for, or ``linger`` seconds after
    the first of them was held, whichever comes first (a member that hangs costs the others
    at most ``linger``, never its timeout). The lane's rules are unchanged: a mark is still
    committed before its caller's end of DATA; a key asked twice still has one winner."""

    def __init__(self, lane: Lane[K, R], linger: float) -> None:
        self._lane = lane
        self._linger = linger
        self._joined: set[int] = set()
        self._held: list[tuple[K, asyncio.Future[R]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def join(self, member: int) -> None:
        self._joined.add(member)

    def leave(self, member: int) -> None:
        """``member`` will ask nothing (more): stop waiting for it."""
        if member in self._joined:
            self._joined.discard(member)
            self._check()

    def submit(self, member: int, key: K) -> asyncio.Future[R]:
        outer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._joined.discard(member)
        self._held.append((key, outer))
        self._check()
        return outer

    def _check(self) -> None:
        if not self._held:
            return
        if not self._joined:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        for key, outer in held:  # one synchronous loop: the lane's next statement takes all
            self._lane.submit(key).add_done_callback(partial(_forward, outer))


def _forward(outer: asyncio.Future[R], inner: asyncio.Future[R]) -> None:
    if outer.done():
        return
    if inner.cancelled():
        outer.cancel()
    elif (error := inner.exception()) is not None:
        outer.set_exception(error)
    else:
        outer.set_result(inner.result())


Outcome = tuple[UUID, int | None, str, str | None]
"""A ``sent`` outcome: (message id, reply code, reply text, subject)."""


class Coalescer:
    """This process's three lanes (a runtime extension: ``coalescer(runtime)``)."""

    def __init__(self, runtime: Runtime) -> None:
        engine = runtime.db.primary
        flush = runtime.settings.NOTIFY_SENDING_MARK_FLUSH

        async def load(ids: Sequence[UUID]) -> dict[UUID, dict[str, Any] | None]:
            return dict(await repository.load_many(engine, ids))

        async def mark(ids: Sequence[UUID]) -> dict[UUID, bool]:
            return dict.fromkeys(await repository.mark_sending_many(engine, ids, flush=flush), True)

        async def sent(outcomes: Sequence[Outcome]) -> dict[Outcome, bool]:
            recorded = await repository.record_sent_many(engine, outcomes)
            return {outcome: outcome[0] in recorded for outcome in outcomes}

        self.load: Lane[UUID, dict[str, Any] | None] = Lane(load, None)
        # Two attempts of one message marked in one statement: one of them wins (ADR 0031).
        # Across statements the compare-and-set (``status = 'queued'``) elects one: the
        # later statement waits for the earlier one's row lock, then finds it ``sending``.
        self.mark: Lane[UUID, bool] = Lane(
            mark, False, exclusive=True, in_flight=runtime.settings.NOTIFY_MARK_IN_FLIGHT
        )
        self.sent: Lane[Outcome, bool] = Lane(sent, False, exclusive=True)


def coalescer(runtime: Runtime) -> Coalescer:
    found = runtime.extensions.get(EXTENSION)
    if found is None:
        found = runtime.extensions[EXTENSION] = Coalescer(runtime)
    assert isinstance(found, Coalescer)
    return found
