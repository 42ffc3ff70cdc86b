"""Which server a read goes to: replicas for reads that may be stale, read-your-writes for a
caller who just wrote, no reads for a replica that lags (ADR 0022).

- ``bind_reader(key)``: who is reading and writing in this task (the web layer binds the
  authenticated caller). Unbound work is never stuck: it reads from a replica when one fits.
- After a unit of work of a bound caller commits a write, ``Database`` records the primary's
  ``pg_current_wal_insert_lsn()`` for that caller (``Sticks``: in Redis when the process has one, so
  every API node sees it; ``DB_STICKY_READS`` long).
- A read of a stuck caller goes to a replica only if *that replica*'s last polled
  ``pg_last_wal_replay_lsn()`` has reached the caller's LSN (replay only moves forward, so a
  polled position is a lower bound), else to the primary. A caught-up replica never releases
  the stick for the others (GitLab's bug); the stick expires by time only.
- ``ReplicaRouter.observe`` takes each poll: replay lag in bytes per replica (the
  ``db_replica_lag_bytes`` gauge); a replica past ``max_lag`` gets no reads.
- ``primary_reads()``: every read of the block (and of the tasks it starts) goes to the
  primary. For a read whose answer is *kept* after an invalidation told the keeper to forget
  the old one (a cache fill, a memory loaded when it joins a pub/sub channel): a replica
  that has not replayed the invalidating write would hand the old answer back to be kept
  for a TTL, and the filler cannot know which write it must have replayed (ADR 0060).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from surge.kit.telemetry import metrics

log = structlog.get_logger()

_READER: ContextVar[str | None] = ContextVar("surge_db_reader", default=None)
_PRIMARY: ContextVar[bool] = ContextVar("surge_db_primary_reads", default=False)


def bind_reader(key: str | None) -> Token[str | None]:
    """The caller whose reads must see its own writes, for the rest of this task."""
    return _READER.set(key)


def current_reader() -> str | None:
    return _READER.get()


@contextmanager
def primary_reads() -> Iterator[None]:
    """Read the primary in this block, whatever the replicas' lag (see the module docstring)."""
    token = _PRIMARY.set(True)
    try:
        yield
    finally:
        _PRIMARY.reset(token)


def reading_primary() -> bool:
    """Whether ``primary_reads()`` is open in this task."""
    return _PRIMARY.get()


def parse_lsn(text: str | None) -> int | None:
    """``'16/B374D848'`` → an integer position in the WAL (None stays None)."""
    if not text:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


class StickStore(Protocol):
    async def get(self, key: str) -> int | None: ...

    async def put(self, key: str, lsn: int, ttl: float) -> None: ...


@dataclass
class MemorySticks:
    """One process's sticks (tests, a single API process, or Redis down)."""

    clock: Callable[[], float] = time.monotonic
    _sticks: dict[str, tuple[int, float]] = field(default_factory=dict)

    async def get(self, key: str) -> int | None:
        found = self._sticks.get(key)
        if found is None:
            return None
        lsn, until = found
        if until <= self.clock():
            del self._sticks[key]
            return None
        return lsn

    async def put(self, key: str, lsn: int, ttl: float) -> None:
        current = self._sticks.get(key)
        lsn = max(lsn, current[0]) if current and current[1] > self.clock() else lsn
        self._sticks[key] = (lsn, self.clock() + ttl)
        if len(self._sticks) > 100_000:  # bounded: drop the expired
            now = self.clock()
            self._sticks = {k: v for k, v in self._sticks.items() if v[1] > now}


#: What a stick store answers when it cannot tell (Redis down): only the primary is safe.
PRIMARY_ONLY = 1 << 63


@dataclass
class RedisSticks:
    """Sticks shared by every process through Redis (``SET key lsn PX ttl``), kept in memory
    too; while Redis is unreachable a caller who wrote in this process is read from the
    primary, and any other bound caller as well (this process cannot know their stick)."""

    gateway: Any
    prefix: str = "surge:db:stick:"
    local: MemorySticks = field(default_factory=MemorySticks)

    async def get(self, key: str) -> int | None:
        try:
            async with self.gateway.guard() as client:
                found = await client.get(self.prefix + key)
        except Exception:
            return PRIMARY_ONLY
        return int(found) if found is not None else await self.local.get(key)

    async def put(self, key: str, lsn: int, ttl: float) -> None:
        await self.local.put(key, lsn, ttl)
        try:
            async with self.gateway.guard() as client:
                await client.set(self.prefix + key, lsn, px=max(1, int(ttl * 1000)))
        except Exception as error:
            log.warning("db.stick_not_shared", error=str(error)[:200])


@dataclass
class ReplicaState:
    replay_lsn: int | None = None
    lag_bytes: int | None = None


class ReplicaRouter:
    """Per replica: its last replay position and lag; picks the replicas a read may use."""

    def __init__(self, names: list[str], *, max_lag: int) -> None:
        self.names = names
        self.max_lag = max_lag
        self.states = [ReplicaState() for _ in names]
        self._next = 0

    def observe(self, primary_lsn: int | None, replays: list[int | None]) -> None:
        for name, state, replay in zip(self.names, self.states, replays, strict=True):
            state.replay_lsn = replay
            if replay is None or primary_lsn is None:
                state.lag_bytes = None
                metrics.DB_REPLICA_LAG.labels(name).set(-1)
                continue
            state.lag_bytes = max(0, primary_lsn - replay)
            metrics.DB_REPLICA_LAG.labels(name).set(state.lag_bytes)

    def eligible(self, index: int, need_lsn: int | None) -> bool:
        """A replica known to lag too far gets no reads. One whose position is unknown (not
        polled yet, not answering: the connection fallback handles a dead one) serves reads
        that may be stale, never a stuck caller's."""
        state = self.states[index]
        if state.lag_bytes is not None and state.lag_bytes > self.max_lag:
            return False
        if need_lsn is None:
            return True
        return state.replay_lsn is not None and state.replay_lsn >= need_lsn

    def candidates(self, need_lsn: int | None) -> list[int]:
        """The replicas a read may go to, round robin from the next one."""
        count = len(self.states)
        start = self._next
        self._next = (self._next + 1) % max(1, count)
        order = [(start + i) % count for i in range(count)]
        return [i for i in order if self.eligible(i, need_lsn)]
