"""Posting pending credits (ADR 0065).

``Ledger.transfer(..., defer_contended_credit=True)`` records the credit leg of a transfer
whose credited row another transaction holds as a ``wallet_pending_credits`` row, in the
caller's unit of work. After that unit of work commits, this process's ``Poster`` for the
engine posts it: one ``wallet_post_credits`` statement per account, a transaction of its
own that locks the account once and writes each pending credit's entry with its exact
balance before/after, deleting the row with it (posted exactly once). Credits committed
while a posting is in flight go together in the next one. ``sweep`` posts whatever is left
(a process that died between a commit and its posting, a posting that failed): the
``wallet.pending_credits.sweep`` job runs it every minute.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from surge.kit.db import OnCommit, autocommit_fetch

log = structlog.get_logger()

#: Most pending credits one posting transaction writes (it holds the account's lock meanwhile).
POST_MAX = 256

_POST = "SELECT wallet_post_credits($1, $2)"
_ACCOUNTS = "SELECT DISTINCT account_id FROM wallet_pending_credits ORDER BY 1"


class Poster:
    """One task per engine drains the accounts it was told of, one account at a time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.accounts: set[int] = set()
        self.task: asyncio.Task[None] | None = None

    def kick(self, account_id: int) -> None:
        self.accounts.add(account_id)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self.accounts:
            account_id = self.accounts.pop()
            try:
                (row,) = await autocommit_fetch(self.engine, _POST, account_id, POST_MAX)
            except Exception:  # the rows stay pending: the next kick or the sweeper posts them
                log.warning("ledger.pending_credits.post_failed", account_id=account_id)
                continue
            if int(row[0]) >= POST_MAX:  # more were waiting than one posting takes
                self.accounts.add(account_id)

    async def idle(self) -> None:
        while self.task is not None and not self.task.done():
            await asyncio.shield(self.task)


class Posters:
    """The process's posters, one per engine (per database and event loop); weak, so a
    disposed engine takes its poster with it."""

    def __init__(self) -> None:
        self._posters: weakref.WeakKeyDictionary[Any, Poster] = weakref.WeakKeyDictionary()

    def of(self, engine: AsyncEngine) -> Poster:
        poster = self._posters.get(engine.sync_engine)
        if poster is None:
            poster = self._posters[engine.sync_engine] = Poster(engine)
        return poster

    def after_commit(self, engine: AsyncEngine, account_id: int) -> OnCommit:
        """An ``on_commit`` callback: tell ``engine``'s poster that ``account_id`` has a
        pending credit (committed by then)."""
        poster = self.of(engine)

        async def kick() -> None:
            poster.kick(account_id)

        return kick

    async def idle(self, engine: AsyncEngine) -> None:
        poster = self._posters.get(engine.sync_engine)
        if poster is not None:
            await poster.idle()


def engine_of(session: AsyncSession) -> AsyncEngine:
    """The engine ``session``'s unit of work runs on (bound to it or to its connection)."""
    bind: Any = session.bind
    return bind if isinstance(bind, AsyncEngine) else bind.engine


async def post(engine: AsyncEngine, account_id: int) -> int:
    """Post ``account_id``'s pending credits now, ``POST_MAX`` per transaction; how many."""
    total = 0
    while True:
        (row,) = await autocommit_fetch(engine, _POST, account_id, POST_MAX)
        total += int(row[0])
        if int(row[0]) < POST_MAX:
            return total


async def sweep(engine: AsyncEngine) -> int:
    """Post every pending credit in the database, one account per transaction (the sweeper
    never holds two accounts' locks: it cannot be part of a lock cycle); how many."""
    total = 0
    for (account_id,) in await autocommit_fetch(engine, _ACCOUNTS):
        total += await post(engine, int(account_id))
    return total
