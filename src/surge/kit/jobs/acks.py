"""The worker's batched acks: jobs that never touched the database are marked done together,
one fenced ``UPDATE ... WHERE lease_token = ANY(...)`` for every job finishing in the same
few milliseconds (ADR 0025).

An ack not sent is not lost work but a job run twice: its lease expires and it is recovered
as stalled. So a failed flush keeps its batch for the next one, a flush cancelled mid-way
puts its batch back, and the worker's shutdown waits for the flush in flight and sends the
rest (``flush_last``) before it stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from surge.kit.jobs import _driver, metrics
from surge.kit.jobs._sql import ACK

log = structlog.get_logger()


class Ackable(Protocol):
    """One attempt of a job: its id, the fencing token of the attempt, its queue."""

    @property
    def id(self) -> int: ...
    @property
    def token(self) -> int: ...
    @property
    def queue(self) -> str: ...


C = TypeVar("C", bound=Ackable)

#: How long a flush waits for more jobs to finish, so that they share its round trip.
GATHER = 0.002
#: Pause after a failed flush before the next one.
RETRY_PAUSE = 0.5


class AckBatcher(Generic[C]):
    """``add`` a finished attempt; ``run_forever`` sends them in batches; ``flush_last`` at
    shutdown. ``acked(attempt)`` is called for each attempt the database marked done."""

    def __init__(self, engine: AsyncEngine, acked: Callable[[C], None]) -> None:
        self.engine = engine
        self.acked = acked
        self.waiting: list[C] = []
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()

    def add(self, attempt: C) -> None:
        self.waiting.append(attempt)
        self._ready.set()

    async def run_forever(self) -> None:
        while True:
            await self._ready.wait()
            await asyncio.sleep(GATHER)
            if not await self.flush():
                await asyncio.sleep(RETRY_PAUSE)  # the lease covers the gap
                self._ready.set()

    async def flush(self) -> bool:
        """Send the acks waiting in one statement; False when it failed (they wait for the
        next flush). One flush at a time: a second one waits for the flush in flight
        instead of finding the list empty while that batch is still unsent."""
        async with self._lock:
            self._ready.clear()
            if not self.waiting:
                return True
            batch, self.waiting = self.waiting, []
            ids = [a.id for a in batch]
            tokens = [a.token for a in batch]
            try:
                rows = await _driver.pooled(self.engine, ACK, (ids, tokens), rows=True)
            except BaseException as error:
                self.waiting = batch + self.waiting  # sent again by the next flush
                if not isinstance(error, Exception):
                    raise
                log.warning("jobs.ack_failed", jobs=len(batch), error=str(error)[:200])
                return False
        done = {row[0] for row in rows}
        for attempt in batch:
            if attempt.id in done:
                self.acked(attempt)
            else:
                metrics.LEASE_LOST.labels(attempt.queue).inc()
                log.warning("jobs.lease_lost", job_id=attempt.id, token=attempt.token, at="ack")
        return True

    async def flush_last(self, within: float) -> None:
        """At shutdown: every ack waiting, the batch in flight included, reaches PostgreSQL
        before the worker stops. A failing flush is tried again for up to ``within`` seconds
        (the lease: past it those jobs are re-run anyway); then what is left is logged."""
        deadline = time.monotonic() + within
        pause = 0.1
        while not await self.flush():
            if time.monotonic() + pause > deadline:
                log.error("jobs.worker.acks_unsent", jobs=[a.id for a in self.waiting])
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
