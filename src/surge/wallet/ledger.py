"""The double-entry ledger under the wallet: accounts, transfers, two-phase reservations,
and the invariant checker that every chaos test and the benchmark run afterwards.

    WalletError (SurgeError)              500 unless a subclass says otherwise
    ├── InsufficientFunds (Conflict)      409: the database's CHECK refused the debit
    │   └── WalletInDebt                  409: the account owes more than it would keep
    ├── IdempotencyKeyReused (Conflict)   409: the key already names a different transfer
    ├── AlreadyResolved (Conflict)        409: the pending transfer was posted or voided
    ├── LedgerNotFound (NotFound)         404: account or pending transfer does not exist
    └── InvalidTransfer (Unprocessable)   422: same account twice, amount ≤ 0

Every balance change goes through one of two PL/pgSQL functions created by migration
``0004_wallet`` — ``wallet_transfer`` and ``wallet_resolve`` — inside the caller's
transaction, so the transfer, both balance updates and both entries commit or vanish
together. Each call is one round trip (the figure that lets a Python ledger keep up with
pgbench, see ``bench/ledger.py``). Accounts are locked in id order, so two transactions that
touch the same accounts queue instead of deadlocking; a transaction that moves money between
more than two accounts calls ``lock()`` first with all of them. A hot system account
(holds, payments) is several rows chosen by owner, each an ordinary account locked by the
same rule (``surge.wallet.accounts``, ADR 0058).

Signs: ``balance`` = posted credits − posted debits, for every account, so the sum of all
balances is zero by construction and a partner's wallet (money the platform owes) is
positive. Guarded accounts (wallets, holds, payouts) must keep ``balance − pending_out ≥ 0``;
revenue and external are the unguarded sources money comes from.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from surge.kit.db import autocommit_fetch, driver_fetch, on_commit
from surge.wallet import invariants, pending_credits
from surge.wallet.accounts import UNGUARDED, SystemAccount, stripe_of
from surge.wallet.ledger_errors import (
    AlreadyResolved,
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidTransfer,
    LedgerNotFound,
    WalletError,
    WalletInDebt,
    translate,
)

log = structlog.get_logger()

__all__ = [
    "AlreadyResolved",
    "Balance",
    "IdempotencyKeyReused",
    "InsufficientFunds",
    "InvalidTransfer",
    "Ledger",
    "LedgerNotFound",
    "Posted",
    "TransferSpec",
    "WalletError",
    "WalletInDebt",
    "ledger",
    "translate",
]


@dataclass(frozen=True, slots=True)
class Posted:
    """The outcome of one ledger call. ``created`` is False when the idempotency key had
    already been used for the same transfer: nothing moved the second time.

    ``credit_balance`` is None when the credit is pending (``transfer(...,
    defer_contended_credit=True)`` found the credited row held by another transaction,
    ADR 0065): the transfer and its debit are committed with the caller's unit of work, the
    credit is posted after it, and the credited account's balance at that point is unknown."""

    transfer_id: int
    created: bool
    debit_balance: int
    credit_balance: int | None

    @property
    def credit_pending(self) -> bool:
        """The credit leg waits for the poster (ADR 0065): not in the credited balance yet."""
        return self.credit_balance is None


class TransferSpec(NamedTuple):
    """One posted transfer of a ``transfer_many`` call."""

    key: str
    debit: int
    credit: int
    amount: int
    currency: str
    kind: str
    reference: str | None = None


@dataclass(frozen=True, slots=True)
class Balance:
    account_id: int
    currency: str
    balance: int
    pending_out: int
    pending_in: int
    debt: int = 0

    @property
    def available(self) -> int:
        """What may still be debited: posted balance minus reservations."""
        return self.balance - self.pending_out

    @property
    def spendable(self) -> int:
        """What the owner may still spend: available minus what it owes (ADR 0042)."""
        return max(0, self.available - self.debt)


# The per-transfer statements go to the driver directly (``driver_fetch``): ``$n``
# placeholders, prepared once per connection by asyncpg's statement cache.
_TRANSFER = (
    "SELECT transfer_id, created, debit_balance, credit_balance "
    "FROM wallet_transfer($1, $2, $3, $4, $5, $6, $7, $8)"
)
_TRANSFER_MANY = text(
    "SELECT t.transfer_id, t.created, t.debit_balance, t.credit_balance "
    "FROM unnest(CAST(:key AS text[]), CAST(:debit AS bigint[]), CAST(:credit AS bigint[]), "
    "            CAST(:amount AS bigint[]), CAST(:currency AS text[]), CAST(:kind AS text[]), "
    "            CAST(:reference AS text[])) WITH ORDINALITY "
    "     AS x(key, debit, credit, amount, currency, kind, reference, n), "
    "LATERAL wallet_transfer(x.key, x.debit, x.credit, x.amount, x.currency, x.kind, "
    "                        x.reference, false) AS t "
    "ORDER BY x.n"
)
_RESOLVE = (
    "SELECT transfer_id, created, debit_balance, credit_balance FROM wallet_resolve($1, $2, $3, $4)"
)
_COLLECT = "SELECT wallet_collect($1, $2, $3)"
_COLLECT_RELEASED = (
    "SELECT wallet_collect(t.debit_account_id, $2, $3) FROM wallet_transfers t WHERE t.id = $1"
)
_COLLECT_MANY = text(
    "SELECT sum(wallet_collect(x.wallet, x.key, x.reference)) "
    "FROM unnest(CAST(:wallet AS bigint[]), CAST(:key AS text[]), CAST(:reference AS text[])) "
    "     AS x(wallet, key, reference)"
)


_TRANSFER_DRIVER = (
    "SELECT transfer_id, created, debit_balance, credit_balance "
    "FROM wallet_transfer($1, $2, $3, $4, $5, $6, $7, false)"
)
_TRANSFER_DEFERRING = (
    "SELECT transfer_id, created, debit_balance, credit_balance "
    "FROM wallet_transfer_deferring($1, $2, $3, $4, $5, $6, $7)"
)
_TRANSFER_BATCH = (
    "SELECT transfer_id, created, debit_balance, credit_balance "
    "FROM wallet_transfer_batch($1, $2, $3, $4, $5, $6, $7)"
)

#: Standalone transfers in flight per engine before new ones wait to be coalesced. One
#: would give the largest batches; two keeps the server busy while a batch's result
#: travels back and the next one is built (ADR 0024 has the measurements).
COALESCE_IN_FLIGHT = 2
#: Most transfers per batch: a batch locks every account it names for its duration.
COALESCE_MAX = 64


class _Coalescer:
    """Standalone transfers on one engine, sent in batches (see ``Ledger.transfer_now``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.waiting: list[tuple[TransferSpec, asyncio.Future[Posted]]] = []
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, spec: TransferSpec) -> Posted:
        future: asyncio.Future[Posted] = asyncio.get_running_loop().create_future()
        self.waiting.append((spec, future))
        if self.in_flight < COALESCE_IN_FLIGHT:
            self.in_flight += 1
            # Its own task: a caller that is cancelled must not cancel the others' batch.
            task = asyncio.create_task(self._drain())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self.waiting:
                batch = self.waiting[:COALESCE_MAX]
                del self.waiting[:COALESCE_MAX]
                try:
                    await self._run(batch)
                except BaseException as error:  # cancelled with the loop: nobody waits forever
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    raise
        finally:
            self.in_flight -= 1

    async def _run(self, batch: list[tuple[TransferSpec, asyncio.Future[Posted]]]) -> None:
        if len(batch) > 1:
            try:
                rows = await autocommit_fetch(
                    self.engine, _TRANSFER_BATCH,
                    *(list(column) for column in zip(*(spec for spec, _ in batch), strict=True)),
                )  # fmt: skip
            except Exception:  # one transfer refused, or the server: each alone, each answered
                log.debug("ledger.batch_failed", size=len(batch))
            else:
                for (_, future), row in zip(batch, rows, strict=True):
                    if not future.done():
                        future.set_result(
                            Posted(int(row[0]), bool(row[1]), int(row[2]), int(row[3]))
                        )
                return
        for spec, future in batch:
            try:
                (row,) = await autocommit_fetch(self.engine, _TRANSFER_DRIVER, *spec)
            except Exception as error:
                if not future.done():
                    domain = translate(error)
                    if domain is not None:
                        domain.__cause__ = error
                    future.set_exception(domain or error)
            else:
                if not future.done():
                    future.set_result(Posted(int(row[0]), bool(row[1]), int(row[2]), int(row[3])))


def _optional(value: Any) -> int | None:
    return None if value is None else int(value)


class Ledger:
    """Stateless service over the ledger tables; the one way balances change.

    System account ids are cached per process once seen committed: they never change
    once created (rows are never deleted)."""

    def __init__(self) -> None:
        #: Per engine (per database and event loop): the standalone transfers waiting for
        #: the next batch. Weak, so a disposed engine takes its coalescer with it.
        self._coalescers: weakref.WeakKeyDictionary[Any, _Coalescer] = weakref.WeakKeyDictionary()
        #: Per engine: the poster of pending credits (ADR 0065).
        self._posters = pending_credits.Posters()
        #: Per engine, (code, currency, stripe) → id: a process may talk to more than one
        #: database (a test, a migration tool), and ids are only unique within one. Keyed by
        #: the engine, not its URL: the same address can serve another database later (a
        #: cluster torn down and built again at the same addresses, a restored backup).
        self._system: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, int], int]] = (
            weakref.WeakKeyDictionary()
        )

    # ---- accounts ------------------------------------------------------------------------
    async def system_account(
        self, session: AsyncSession, code: SystemAccount, *, currency: str, stripe: int = 0
    ) -> int:
        """The id of system account ``code`` in ``currency`` (its ``stripe``, ADR 0058),
        created on first use."""
        known = self._system.setdefault(session.get_bind().engine, {})
        cached = known.get((code, currency, stripe))
        if cached is not None:
            return cached
        created = (
            await session.execute(
                text(
                    "INSERT INTO wallet_accounts (code, currency, guarded, stripe) "
                    "VALUES (:c, :cur, :g, :s) "
                    "ON CONFLICT (code, currency, stripe) WHERE owner_id IS NULL DO NOTHING "
                    "RETURNING id"
                ),
                {"c": code.value, "cur": currency, "g": code not in UNGUARDED, "s": stripe},
            )
        ).scalar_one_or_none()
        if created is not None:
            # Not cached: until this transaction commits, the row exists for nobody else
            # (a concurrent transaction given this id would find no account).
            return int(created)
        account_id = int(
            (
                await session.execute(
                    text(
                        "SELECT id FROM wallet_accounts WHERE code = :c AND currency = :cur "
                        "AND stripe = :s AND owner_id IS NULL"
                    ),
                    {"c": code.value, "cur": currency, "s": stripe},
                )
            ).scalar_one()
        )
        known[(code, currency, stripe)] = account_id
        return account_id

    async def system_account_for(
        self, session: AsyncSession, code: SystemAccount, owner_id: UUID, *, currency: str
    ) -> int:
        """The stripe of system account ``code`` that movements concerning ``owner_id`` use
        (``accounts.stripe_of``; the one row of an account that is not striped)."""
        return await self.system_account(
            session, code, currency=currency, stripe=stripe_of(code, owner_id)
        )

    async def open_wallet(self, session: AsyncSession, owner_id: UUID, *, currency: str) -> int:
        """The id of ``owner_id``'s guarded wallet in ``currency``, created on first use."""
        row = (
            await session.execute(
                text(
                    "INSERT INTO wallet_accounts (owner_id, code, currency) "
                    "VALUES (:o, 'wallet', :cur) "
                    "ON CONFLICT (owner_id, currency) WHERE owner_id IS NOT NULL DO NOTHING "
                    "RETURNING id"
                ),
                {"o": owner_id, "cur": currency},
            )
        ).scalar_one_or_none()
        if row is not None:
            return int(row)
        return int(
            (
                await session.execute(
                    text("SELECT id FROM wallet_accounts WHERE owner_id = :o AND currency = :cur"),
                    {"o": owner_id, "cur": currency},
                )
            ).scalar_one()
        )

    async def open_wallets(
        self, session: AsyncSession, owner_ids: Sequence[UUID], *, currency: str
    ) -> dict[UUID, int]:
        """``open_wallet`` for many owners in two round trips (an earnings batch)."""
        await session.execute(
            text(
                "INSERT INTO wallet_accounts (owner_id, code, currency) "
                "SELECT o, 'wallet', :cur FROM unnest(CAST(:owners AS uuid[])) AS o "
                "ON CONFLICT (owner_id, currency) WHERE owner_id IS NOT NULL DO NOTHING"
            ),
            {"owners": list(owner_ids), "cur": currency},
        )
        rows = await session.execute(
            text(
                "SELECT owner_id, id FROM wallet_accounts "
                "WHERE owner_id = ANY(CAST(:owners AS uuid[])) AND currency = :cur"
            ),
            {"owners": list(owner_ids), "cur": currency},
        )
        return {owner: int(account) for owner, account in rows.all()}

    async def wallet_of(
        self, session: AsyncSession, owner_id: UUID, *, currency: str
    ) -> int | None:
        value = (
            await session.execute(
                text("SELECT id FROM wallet_accounts WHERE owner_id = :o AND currency = :cur"),
                {"o": owner_id, "cur": currency},
            )
        ).scalar_one_or_none()
        return None if value is None else int(value)

    async def balance(self, session: AsyncSession, account_id: int) -> Balance:
        row = (
            await session.execute(
                text(
                    "SELECT id, currency, balance, pending_out, pending_in, debt "
                    "FROM wallet_accounts WHERE id = :id"
                ),
                {"id": account_id},
            )
        ).one_or_none()
        if row is None:
            raise LedgerNotFound(f"no account {account_id}")
        return Balance(*row)

    async def lock(self, session: AsyncSession, account_ids: Iterable[int]) -> set[int]:
        """Lock ``account_ids`` for this transaction in id order. Call it before a sequence
        of transfers over more than two accounts, so every transaction acquires its locks
        in the one global order and none can wait on another in a cycle.

        Returns the locked accounts that are in debt (ADR 0042), read by the same
        statement: while this transaction holds them, no other can change that."""
        ids = sorted(set(account_ids))
        rows = await session.execute(
            text(
                "SELECT id, debt FROM wallet_accounts WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"
            ),
            {"ids": ids},
        )
        return {int(account) for account, debt in rows.all() if debt > 0}

    # ---- movements -----------------------------------------------------------------------
    async def transfer(
        self,
        session: AsyncSession,
        *,
        key: str,
        debit: int,
        credit: int,
        amount: int,
        currency: str,
        kind: str,
        reference: str | None = None,
        pending: bool = False,
        defer_contended_credit: bool = False,
    ) -> Posted:
        """Move ``amount`` minor units from ``debit`` to ``credit`` (posted at once), or
        reserve it (``pending=True``: the debit's available balance drops now, the posted
        balances move only on ``post``). Idempotent by ``key``.

        ``defer_contended_credit`` (ADR 0065; not with ``pending``): if another transaction
        holds the credited account's row, do not wait for it: the debit applies as always,
        the credit is recorded as pending in this unit of work and posted, with its exact
        balance before/after, by this process right after the commit (the sweeper job posts
        what a crash left). The result's ``credit_balance`` is then None. For a caller that
        neither reads the credited balance nor spends from it later in the same unit of work
        (a debt ``collect`` after the credit would not see it)."""
        if amount <= 0:
            raise InvalidTransfer("amount must be a positive number of minor units")
        if not defer_contended_credit:
            return await self._call(
                session, _TRANSFER, key, debit, credit, amount, currency, kind, reference, pending
            )
        if pending:
            raise InvalidTransfer("a reservation cannot defer its credit")
        posted = await self._call(
            session, _TRANSFER_DEFERRING, key, debit, credit, amount, currency, kind, reference
        )
        if posted.credit_pending:
            on_commit(
                session, self._posters.after_commit(pending_credits.engine_of(session), credit)
            )
        return posted

    async def post_pending_credits(self, engine: AsyncEngine, account_id: int) -> int:
        """Post ``account_id``'s pending credits now (ADR 0065); how many."""
        return await pending_credits.post(engine, account_id)

    async def sweep_pending_credits(self, engine: AsyncEngine) -> int:
        """Post every pending credit in the database (what a crash left); how many."""
        return await pending_credits.sweep(engine)

    async def posting_idle(self, engine: AsyncEngine) -> None:
        """Until this process's poster on ``engine`` has posted what it was told of."""
        await self._posters.idle(engine)

    async def transfer_now(
        self,
        engine: AsyncEngine,
        *,
        key: str,
        debit: int,
        credit: int,
        amount: int,
        currency: str,
        kind: str,
        reference: str | None = None,
    ) -> Posted:
        """A transfer that is a whole unit of work by itself (an adjustment, an import, a
        payment settled elsewhere): one statement in autocommit mode on the driver's
        connection, so one round trip instead of BEGIN + call + COMMIT. Atomic all the same
        — a statement is a transaction — and the hot account's row lock is released inside
        the server, without waiting for the client's COMMIT.

        Coalesced (TigerBeetle's batching, ADR 0024): the standalone transfers this process
        is asked for while ``COALESCE_IN_FLIGHT`` calls are already in flight on ``engine``
        wait for the next call and go in it together, one ``wallet_transfer_batch``
        statement — one round trip, one commit, one WAL flush, one hold of a hot wallet's
        lock for all of them. Alone, a transfer goes at once (no added wait). Each keeps its
        idempotency key, its entries and an exact balance before/after, and gets its own
        ``Posted`` or its own error: when a batch fails, its transfers are run again one
        by one. ``bench/ledger.py`` measures this path and the unit-of-work path.

        Use ``transfer()`` whenever the transfer must commit with other writes."""
        if amount <= 0:
            raise InvalidTransfer("amount must be a positive number of minor units")
        if debit == credit:
            raise InvalidTransfer("a transfer needs two different accounts")
        spec = TransferSpec(key, debit, credit, amount, currency, kind, reference)
        coalescer = self._coalescers.get(engine.sync_engine)
        if coalescer is None:
            coalescer = self._coalescers[engine.sync_engine] = _Coalescer(engine)
        return await coalescer.submit(spec)

    async def transfer_many(
        self,
        session: AsyncSession,
        transfers: Sequence[TransferSpec],
        *,
        repay_debts: bool = False,
    ) -> list[Posted]:
        """Many posted transfers in the caller's transaction, in two round trips whatever
        their number (an earnings batch of 50 would otherwise be 50): ``lock()`` on every
        account involved, then one statement calling ``wallet_transfer`` once per row.
        Each transfer keeps its own idempotency key; the result is in input order.

        ``repay_debts``: each new credit to an account in debt (the lock statement says
        which, at no cost) then repays it (``collect`` under ``<key>:debt``, one more round
        trip only when some account owes)."""
        if not transfers:
            return []
        if any(spec.amount <= 0 for spec in transfers):
            raise InvalidTransfer("amount must be a positive number of minor units")
        owing = await self.lock(
            session, [a for spec in transfers for a in (spec.debit, spec.credit)]
        )
        columns = list(zip(*transfers, strict=True))
        params = dict(zip(TransferSpec._fields, (list(column) for column in columns), strict=True))
        try:
            rows = (await session.execute(_TRANSFER_MANY, params)).all()
        except DBAPIError as error:
            domain = translate(error)
            if domain is None:
                raise
            raise domain from error
        posted = [Posted(int(r[0]), bool(r[1]), int(r[2]), int(r[3])) for r in rows]
        if repay_debts and owing:
            await self.collect_many(
                session,
                [
                    (spec.credit, f"{spec.key}:debt", spec.reference)
                    for spec, result in zip(transfers, posted, strict=True)
                    if result.created and spec.credit in owing
                ],
            )
        return posted

    async def post(self, session: AsyncSession, *, key: str, pending_id: int, kind: str) -> Posted:
        """Second phase: the reserved amount moves for good."""
        return await self._call(session, _RESOLVE, key, pending_id, True, kind)

    async def void(self, session: AsyncSession, *, key: str, pending_id: int, kind: str) -> Posted:
        """Second phase: the reservation is released; no posted balance moves."""
        return await self._call(session, _RESOLVE, key, pending_id, False, kind)

    async def collect(
        self, session: AsyncSession, account_id: int, *, key: str, reference: str | None = None
    ) -> int:
        """Repay what ``account_id`` owes from its free balance (``least(debt, balance −
        pending_out)``, a transfer to receivables keyed ``key``); returns the amount, 0
        without a debt or when ``key`` was used already. Call it after a credit to the
        account in the same transaction, with that credit's key plus a suffix: the
        receivables row is then the last lock the transaction takes (ADR 0042)."""
        return await self._collect(session, _COLLECT, account_id, key, reference)

    async def collect_released(
        self, session: AsyncSession, pending_id: int, *, key: str, reference: str | None = None
    ) -> int:
        """``collect`` on the account a voided reservation ``pending_id`` gave back to."""
        return await self._collect(session, _COLLECT_RELEASED, pending_id, key, reference)

    async def _collect(self, session: AsyncSession, statement: str, *args: Any) -> int:
        # No domain error to translate: the amount never exceeds the free balance or the debt.
        (row,) = await driver_fetch(session, statement, *args)
        return int(row[0])

    async def collect_many(
        self, session: AsyncSession, debts: Sequence[tuple[int, str, str | None]]
    ) -> int:
        """``collect`` for many (account, key, reference) in one round trip; the total."""
        if not debts:
            return 0
        wallets, keys, references = (list(column) for column in zip(*debts, strict=True))
        total = (
            await session.execute(
                _COLLECT_MANY, {"wallet": wallets, "key": keys, "reference": references}
            )
        ).scalar_one()
        return int(total or 0)

    async def _call(self, session: AsyncSession, statement: str, *args: Any) -> Posted:
        """One ledger function call in the session's unit of work: one round trip, through
        the driver (``driver_fetch``: SQLAlchemy's statement path cost more than the call)."""
        try:
            (row,) = await driver_fetch(session, statement, *args)
        except DBAPIError as error:
            domain = translate(error)
            if domain is None:
                raise
            raise domain from error
        return Posted(int(row[0]), bool(row[1]), int(row[2]), _optional(row[3]))

    # ---- invariants (docs/architecture.md §6) -----------------------------------------------------
    async def check_invariants(self, session: AsyncSession) -> list[str]:
        """Every violation of the money rules, as readable lines; empty when all hold
        (``surge.wallet.invariants`` lists them)."""
        return await invariants.check_invariants(session)


ledger = Ledger()
