"""The wallet's use cases (seed 001): earnings from revenue events, withdrawals with admin
approval, and the partner's reads — every money movement through ``surge.wallet.ledger``.

Errors: the tree is drawn in ``surge.wallet.errors``.

    from surge.wallet.service import wallet as wallet_service

Stateless: methods take the session first, then the ``Runtime`` when they read settings
or the cache. Decisions are audited here (``surge.audit``), single or batched alike.

Ownership is checked here, in the service (every partner-facing method takes the acting
owner's id and filters by it), not in the routes: a new endpoint cannot forget it.

Money arithmetic (integers only): shown profit = ⌊profit × share_bps / 10 000⌋ and
earning = ⌊profit × share_bps × commission_bps / 10⁸⌋ — one rounding, toward zero, at the
end, so a partner is never credited more than its exact share and the fractions stay with
the platform. An earning below one minor unit is skipped (no transfer, no row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import structlog
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.service import audit as audit_service
from surge.identity.service import identity as identity_service
from surge.kit.errors import NotFound, SurgeError
from surge.kit.jobs import enqueue
from surge.kit.runtime import Runtime
from surge.kit.web.pagination import Slice
from surge.models.wallet import Earning, Partner, RevenueEvent, Withdrawal
from surge.wallet import oversight, payout_rules, repository
from surge.wallet.accounts import SystemAccount
from surge.wallet.errors import (
    NotAPartner,
    RevenueEventConflict,
    RevenueEventOutOfBounds,
    WithdrawalAlreadyDecided,
    WithdrawalKeyMismatch,
    WithdrawalNotFound,
    WithdrawalOutOfBounds,
)
from surge.wallet.ledger import Balance, Ledger, TransferSpec, WalletInDebt, ledger
from surge.wallet.values import BatchItem, earning_for, withdrawal_id_for

log = structlog.get_logger()

#: ``session.info`` key: owners whose figures this unit of work changed (the edge that
#: commits it invalidates their cached stats; see ``changed_owners``).
CHANGED = "wallet.changed_owners"
EARNINGS_JOB = "wallet.earnings.credit"
NOTIFY_JOB = "wallet.withdrawal.notify"
#: pg advisory lock key: one stats refresh at a time across every process.
STATS_LOCK = 7_421_010


def changed_owners(session: AsyncSession) -> set[UUID]:
    """Owners whose balance, earnings or withdrawals changed in ``session``'s unit of work."""
    owners: set[UUID] = session.info.setdefault(CHANGED, set())
    return owners


def stats_key(owner_id: UUID) -> str:
    """The cache key of an owner's dashboard stats."""
    return f"wallet:stats:{owner_id}"


class WalletService:
    """The wallet domain's use cases (see the module docstring)."""

    def __init__(self, ledger_: Ledger) -> None:
        self.ledger = ledger_

    def currency(self, runtime: Runtime) -> str:
        return runtime.settings.WALLET_CURRENCY

    def _changed(self, session: AsyncSession, owner_id: UUID) -> None:
        changed_owners(session).add(owner_id)

    def invalidate_after_commit(self, session: AsyncSession, runtime: Runtime) -> None:
        """Forget the cached stats of every owner this unit of work changed, once it commits."""
        owners = changed_owners(session)
        if owners:
            runtime.cache.invalidate_on_commit(session, keys=[stats_key(o) for o in owners])

    # ---- partners ------------------------------------------------------------------------
    async def set_partner(
        self,
        session: AsyncSession,
        runtime: Runtime,
        owner_id: UUID,
        *,
        share_bps: int,
        commission_bps: int | None = None,
        active: bool = True,
    ) -> Partner:
        """Create or update a partner's terms and open its wallet."""
        commission = (
            runtime.settings.WALLET_COMMISSION_BPS if commission_bps is None else commission_bps
        )
        partner = await repository.upsert_partner(
            session, owner_id, share_bps=share_bps, commission_bps=commission, active=active
        )
        await self.ledger.open_wallet(session, owner_id, currency=self.currency(runtime))
        return partner

    async def set_partner_terms(
        self,
        session: AsyncSession,
        runtime: Runtime,
        admin_id: UUID,
        owner_id: UUID,
        *,
        share_bps: int,
        commission_bps: int | None,
        active: bool,
        request_id: str | None = None,
        approved_by: UUID | None = None,
    ) -> Partner:
        """An admin sets a partner's terms (and opens its wallet); audited. The user must
        exist (404) and hold the partner or reseller role (422). Terms above
        ``APPROVAL_TERMS_BPS`` wait for a second administrator (ADR 0059)."""
        user = await identity_service.get_user(session, owner_id)
        if user.role not in {"partner", "reseller"}:
            raise NotAPartner("Only partners and resellers have commercial terms.")
        await oversight.gate_terms(
            session, runtime, admin_id, owner_id, share_bps=share_bps,
            commission_bps=commission_bps, active=active, approved_by=approved_by,
            request_id=request_id,
        )  # fmt: skip
        partner = await self.set_partner(
            session, runtime, owner_id, share_bps=share_bps, commission_bps=commission_bps,
            active=active,
        )  # fmt: skip
        await audit_service.record(
            session, admin_id, action="wallet.partner.terms", subject_type="user",
            subject_id=str(owner_id),
            after={"share_bps": share_bps, "commission_bps": commission_bps, "active": active,
                   **oversight.approved(approved_by)},
            request_id=request_id,
        )  # fmt: skip
        return partner

    # ---- earnings ------------------------------------------------------------------------
    async def record_revenue_event(
        self,
        session: AsyncSession,
        runtime: Runtime,
        *,
        event_id: str,
        kind: str,
        profit: int,
        occurred_at: datetime | None = None,
        admin_id: UUID | None = None,
        request_id: str | None = None,
        approved_by: UUID | None = None,
    ) -> tuple[RevenueEvent, bool]:
        """Record an event once (its id is the idempotency key) and, in the same
        transaction, enqueue the first earnings batch. Returns (event, created).

        Recorded by an administrator (``admin_id``) rather than the platform's service key,
        it is a person crediting every partner: audited, in this transaction (ADR 0051)."""
        bound = runtime.settings.WALLET_REVENUE_EVENT_MAX
        if abs(profit) > bound:
            raise RevenueEventOutOfBounds(
                f"A revenue event's profit must be between -{bound} and {bound} minor units."
            )
        if admin_id is not None:  # a person crediting every partner: four-eyes (ADR 0059)
            await oversight.gate_revenue_event(
                session, runtime, admin_id, event_id=event_id, kind=kind, profit=profit,
                occurred_at=occurred_at, approved_by=approved_by, request_id=request_id,
            )  # fmt: skip
        event, created = await repository.insert_revenue_event(
            session, event_id=event_id, kind=kind, profit=profit,
            currency=self.currency(runtime), occurred_at=occurred_at or datetime.now(UTC),
        )  # fmt: skip
        if not created:
            if (event.kind, event.profit) != (kind, profit):
                raise RevenueEventConflict(
                    f"revenue event {event_id} was already recorded with other figures"
                )
            return event, False
        await enqueue(
            session, EARNINGS_JOB, {"event_id": event_id, "after": None},
            dedup_key=f"earnings:{event_id}:",
        )  # fmt: skip
        if admin_id is not None:
            await audit_service.record(
                session, admin_id, action="wallet.revenue_event.record",
                subject_type="revenue_event", subject_id=event_id,
                after={"kind": kind, "profit": profit, "currency": event.currency,
                       **oversight.approved(approved_by)},
                request_id=request_id,
            )  # fmt: skip
        log.info("wallet.revenue_event.recorded", event_id=event_id, kind=kind)
        return event, True

    async def credit_earnings_batch(
        self, session: AsyncSession, runtime: Runtime, *, event_id: str, after: UUID | None
    ) -> UUID | None:
        """Credit the next ``WALLET_EARNINGS_BATCH`` partners active since before the event
        (by owner id, after ``after``) for ``event_id``, in the caller's transaction, and
        enqueue the next batch.

        Exactly once per (event, partner): each credit is a ledger transfer keyed
        ``earning:{event}:{owner}``, and the earning row is written only when that transfer
        was new. A batch killed half-way rolls back whole; its retry replays nothing twice.
        Returns the last owner of this batch, or None when the event is fully credited.
        """
        event = await repository.revenue_event(session, event_id)
        if event is None:
            raise NotFound(f"no revenue event {event_id}")
        size = runtime.settings.WALLET_EARNINGS_BATCH
        rows = await repository.partners_to_credit(session, event, after=after, limit=size)
        if not rows:
            return None
        revenue = await self.ledger.system_account(
            session, SystemAccount.revenue, currency=event.currency
        )
        wallets = await self.ledger.open_wallets(
            session, [row.owner_id for row in rows], currency=event.currency
        )
        # One statement for the whole batch, after one lock acquisition in id order (ADR
        # 0010: no deadlocks between batches of different events, which all debit revenue).
        due = []
        for row in rows:
            shown, amount = earning_for(event.profit, row.share_bps, row.commission_bps)
            if amount >= 1:
                due.append((row, shown, amount))
        specs = [
            TransferSpec(
                key=f"earning:{event_id}:{row.owner_id}",
                debit=revenue,
                credit=wallets[row.owner_id],
                amount=amount,
                currency=event.currency,
                kind="earning",
                reference=event_id,
            )
            for row, _, amount in due
        ]
        # An earning repays its owner's debt first (ADR 0042).
        posted = await self.ledger.transfer_many(session, specs, repay_debts=True)
        credited = 0
        for (row, shown, amount), result in zip(due, posted, strict=True):
            if not result.created:  # credited by an earlier attempt that committed
                continue
            session.add(
                Earning(
                    event_id=event_id,
                    owner_id=row.owner_id,
                    transfer_id=result.transfer_id,
                    shown_profit=shown,
                    amount=amount,
                    currency=event.currency,
                    share_bps=row.share_bps,
                    commission_bps=row.commission_bps,
                    event_kind=event.kind,
                )
            )
            credited += 1
            self._changed(session, row.owner_id)
        await session.flush()
        last: UUID = rows[-1].owner_id
        more = len(rows) == size
        if more:
            await enqueue(
                session, EARNINGS_JOB, {"event_id": event_id, "after": str(last)},
                dedup_key=f"earnings:{event_id}:{last}",
            )  # fmt: skip
        log.info("wallet.earnings.batch", event_id=event_id, partners=len(rows), credited=credited)
        return last if more else None

    # ---- withdrawals ---------------------------------------------------------------------
    async def request_withdrawal(
        self,
        session: AsyncSession,
        runtime: Runtime,
        owner_id: UUID,
        *,
        amount: int,
        key: str | None = None,
    ) -> Withdrawal:
        """Reserve ``amount`` from the owner's wallet (a pending transfer to holds) and
        record the request. Insufficient available funds → 409, refused by the database.

        With the client's ``key`` (its Idempotency-Key) the withdrawal's id derives from it:
        the same key names the same withdrawal even after the HTTP layer forgot the key
        (a replay a day later reserves nothing twice; another amount is a 422)."""
        settings = runtime.settings
        low, high = settings.WALLET_WITHDRAWAL_MIN, settings.WALLET_WITHDRAWAL_MAX
        if not low <= amount <= high:
            raise WithdrawalOutOfBounds(
                f"A withdrawal must be between {low} and {high} minor units."
            )
        withdrawal_id = uuid4() if key is None else withdrawal_id_for(owner_id, key)
        if key is not None:
            existing = await repository.owner_withdrawal(session, owner_id, withdrawal_id)
            if existing is not None:
                if existing.amount != amount:
                    raise WithdrawalKeyMismatch(
                        "This Idempotency-Key was already used for a withdrawal of another amount."
                    )
                return existing
        currency = self.currency(runtime)
        wallet = await self.ledger.wallet_of(
            session, owner_id, currency=currency
        ) or await self.ledger.open_wallet(session, owner_id, currency=currency)
        # The owner's stripe of holds (ADR 0058): requests of owners on other stripes lock
        # other rows, and never wait for this one's COMMIT.
        holds = await self.ledger.system_account_for(
            session, SystemAccount.holds, owner_id, currency=currency
        )
        # Wallet and holds locked in the ledger's order before reading: a concurrent request
        # (or a credit) cannot change what is withdrawable between the check and the transfer.
        await self.ledger.lock(session, [wallet, holds])
        await payout_rules.check(session, settings, self.ledger, owner_id, wallet, amount=amount)
        posted = await self.ledger.transfer(
            session,
            key=f"withdrawal:{withdrawal_id}",
            debit=wallet,
            credit=holds,
            amount=amount,
            currency=currency,
            kind="withdrawal",
            reference=str(withdrawal_id),
            pending=True,
        )
        withdrawal = Withdrawal(
            id=withdrawal_id, owner_id=owner_id, account_id=wallet, amount=amount,
            currency=currency, status="pending", transfer_id=posted.transfer_id,
        )  # fmt: skip
        session.add(withdrawal)
        await session.flush()
        await session.refresh(withdrawal)
        self._changed(session, owner_id)
        self.invalidate_after_commit(session, runtime)
        log.info("wallet.withdrawal.requested", withdrawal_id=str(withdrawal_id), amount=amount)
        return withdrawal

    async def decide(
        self,
        session: AsyncSession,
        runtime: Runtime,
        admin_id: UUID,
        withdrawal_id: UUID,
        *,
        approve: bool,
        reason: str | None = None,
        request_id: str | None = None,
        batch: bool = False,
        approved_by: UUID | None = None,
    ) -> tuple[Withdrawal, bool]:
        """Approve (post the reservation, then move it from holds to payouts) or reject
        (void it), audited with the amount. Idempotent: deciding the same way twice returns
        the withdrawal as is (and False: nothing changed, nothing audited); the other way is
        409. Enqueues the partner's notification. A payout above ``APPROVAL_THRESHOLD``
        waits for a second administrator (ADR 0059; a batch gates before its savepoints)."""
        withdrawal = await repository.withdrawal_for_update(session, withdrawal_id)
        if withdrawal is None:
            raise WithdrawalNotFound(f"no withdrawal {withdrawal_id}")
        target = "approved" if approve else "rejected"
        if withdrawal.status == target:
            return withdrawal, False
        if withdrawal.status != "pending":
            raise WithdrawalAlreadyDecided(f"withdrawal {withdrawal_id} is {withdrawal.status}")
        if approve and not batch:
            await oversight.gate_payout(
                session, runtime, admin_id, withdrawal, approved_by=approved_by,
                request_id=request_id,
            )  # fmt: skip
        currency = withdrawal.currency
        # The holds stripe the reservation credited (ADR 0058): posted into, then emptied
        # into payouts, so each stripe stays non-negative by itself.
        holds = await repository.reserved_into(session, withdrawal.transfer_id)
        key = f"withdrawal:{withdrawal_id}"
        if approve:
            payouts = await self.ledger.system_account(
                session, SystemAccount.payouts, currency=currency
            )
            in_debt = await self.ledger.lock(session, [withdrawal.account_id, holds, payouts])
            if withdrawal.account_id in in_debt:
                raise WalletInDebt("The partner is in debt (ADR 0042): reject, never pay out.")
            resolution = await self.ledger.post(
                session, key=f"{key}:post", pending_id=withdrawal.transfer_id, kind="withdrawal"
            )
            await self.ledger.transfer(
                session, key=f"{key}:payout", debit=holds, credit=payouts,
                amount=withdrawal.amount, currency=currency, kind="payout", reference=str(withdrawal_id),
            )  # fmt: skip
        else:
            resolution = await self.ledger.void(
                session, key=f"{key}:void", pending_id=withdrawal.transfer_id, kind="withdrawal"
            )
            if resolution.created:  # the released amount repays a debt first (ADR 0042)
                await self.ledger.collect(session, withdrawal.account_id, key=f"{key}:void:debt")
        withdrawal.status = target
        withdrawal.resolution_transfer_id = resolution.transfer_id
        withdrawal.decided_by = admin_id
        withdrawal.decided_at = datetime.now(UTC)
        withdrawal.reason = reason
        await session.flush()
        await enqueue(
            session, NOTIFY_JOB, {"withdrawal_id": str(withdrawal_id), "status": target},
            dedup_key=f"withdrawal-notify:{withdrawal_id}",
        )  # fmt: skip
        self._changed(session, withdrawal.owner_id)
        after: dict[str, Any] = {"status": target, "amount": withdrawal.amount, "reason": reason}
        if batch:
            after["batch"] = True
        after.update(oversight.approved(approved_by))
        await audit_service.record(
            session, admin_id,
            action="wallet.withdrawal.approve" if approve else "wallet.withdrawal.reject",
            subject_type="withdrawal", subject_id=str(withdrawal_id),
            before={"status": "pending", "amount": withdrawal.amount}, after=after,
            request_id=request_id,
        )  # fmt: skip
        log.info("wallet.withdrawal.decided", withdrawal_id=str(withdrawal_id), status=target)
        return withdrawal, True

    async def batch_approve(
        self,
        session: AsyncSession,
        runtime: Runtime,
        admin_id: UUID,
        ids: Sequence[UUID],
        *,
        request_id: str | None = None,
    ) -> list[BatchItem]:
        """Approve each withdrawal in its own savepoint: one failing item is reported and
        rolled back alone (with its audit row), the others commit with the request; each
        approval is audited exactly like a single one.

        Every lock the batch needs is taken first, in the global order (withdrawal rows by
        id, then accounts by id; ADR 0010): deciding items one by one would take them
        interleaved (W1, accounts, W2, accounts...) and deadlock against another batch in
        another order, a single approval, or a partner's withdrawal request."""
        unique = list(dict.fromkeys(ids))  # duplicates decided once, order kept
        rows = await repository.lock_withdrawals(session, unique)
        accounts = {row.account_id for row in rows} | {row.credit_account_id for row in rows}
        for currency in {row.currency for row in rows}:
            accounts.add(
                await self.ledger.system_account(session, SystemAccount.payouts, currency=currency)
            )
        await self.ledger.lock(session, accounts)
        results: list[BatchItem] = []
        for withdrawal_id in unique:
            try:
                # Outside the savepoint: a payout above the threshold is recorded pending
                # (and kept) while the item reports 202 (ADR 0059).
                await oversight.gate_batch_item(
                    session, runtime, admin_id, withdrawal_id, request_id=request_id
                )
                async with session.begin_nested():
                    withdrawal, changed = await self.decide(
                        session, runtime, admin_id, withdrawal_id, approve=True,
                        request_id=request_id, batch=True,
                    )  # fmt: skip
                results.append(
                    BatchItem(withdrawal_id, True, status=withdrawal.status, changed=changed)
                )
            except SurgeError as error:
                results.append(
                    BatchItem(withdrawal_id, False, error=error.message, code=error.status_code)
                )
        return results

    async def withdrawal(
        self, session: AsyncSession, owner_id: UUID, withdrawal_id: UUID
    ) -> Withdrawal:
        """The owner's withdrawal; another owner's is "not found", never "forbidden"."""
        found = await repository.owner_withdrawal(session, owner_id, withdrawal_id)
        if found is None:
            raise WithdrawalNotFound(f"no withdrawal {withdrawal_id}")
        return found

    async def withdrawal_by_id(
        self, session: AsyncSession, withdrawal_id: UUID
    ) -> Withdrawal | None:
        """Any owner's withdrawal (jobs; never a partner-facing read)."""
        return await repository.withdrawal(session, withdrawal_id)

    # ---- reads ---------------------------------------------------------------------------
    async def balance(
        self, session: AsyncSession, runtime: Runtime, owner_id: UUID
    ) -> Balance | None:
        """The owner's real-time balance (primary), or None before its first wallet."""
        wallet = await self.ledger.wallet_of(session, owner_id, currency=self.currency(runtime))
        return None if wallet is None else await self.ledger.balance(session, wallet)

    async def withdrawable(
        self, session: AsyncSession, runtime: Runtime, owner_id: UUID
    ) -> tuple[Balance, int] | None:
        """The real-time balance and the part of it a withdrawal may take (ADR 0033)."""
        currency = self.currency(runtime)
        wallet = await self.ledger.wallet_of(session, owner_id, currency=currency)
        if wallet is None:
            return None
        balance, withdrawable = await payout_rules.withdrawable(session, self.ledger, wallet)
        return balance, max(withdrawable, 0)

    async def system_balances(self, session: AsyncSession) -> list[dict[str, Any]]:
        """The platform's accounts per currency, each summed over its stripes (ADR 0058):
        code, currency, balance, pending in/out, stripes, smallest and largest stripe."""
        return await repository.system_balances(session)

    async def transactions(
        self,
        session: AsyncSession,
        runtime: Runtime,
        owner_id: UUID,
        *,
        limit: int,
        cursor: str | None,
    ) -> Slice[Row[Any]]:
        """The owner's wallet history, newest posting first, with balances before/after."""
        account = await self.ledger.wallet_of(session, owner_id, currency=self.currency(runtime))
        if account is None:
            if cursor:  # a forged cursor is a 400, wallet or not
                repository.ENTRIES_NEWEST_FIRST.after(cursor)
            return Slice([], None)
        return await repository.entries(session, account, limit=limit, cursor=cursor)

    async def earnings(
        self, session: AsyncSession, owner_id: UUID, *, limit: int, cursor: str | None
    ) -> Slice[Row[Any]]:
        """The owner's earnings, newest first."""
        return await repository.earnings(session, owner_id, limit=limit, cursor=cursor)

    async def withdrawals(
        self, session: AsyncSession, owner_id: UUID, *, limit: int, cursor: str | None
    ) -> Slice[Row[Any]]:
        """The owner's withdrawals, newest first."""
        return await repository.withdrawals(session, owner_id, limit=limit, cursor=cursor)

    async def withdrawals_by_status(
        self, session: AsyncSession, status: str, *, limit: int, cursor: str | None
    ) -> Slice[Row[Any]]:
        """Every owner's withdrawals in one status, oldest first (the approval queue)."""
        return await repository.withdrawals_by_status(session, status, limit=limit, cursor=cursor)

    async def stats(
        self, session: AsyncSession, runtime: Runtime, owner_id: UUID
    ) -> dict[str, Any]:
        """The owner's dashboard figures (materialized view + what happened since) and its
        real-time balance."""
        currency = self.currency(runtime)
        figures = await repository.stats(session, owner_id, currency)
        current = await self.balance(session, runtime, owner_id)
        figures["balance"] = current.balance if current else 0
        figures["available"] = current.available if current else 0
        figures["currency"] = currency
        return figures

    async def cached_stats(
        self, runtime: Runtime, owner_id: UUID, shape: Callable[[dict[str, Any]], Any]
    ) -> Any:
        """``stats`` through the process's cache for ``WALLET_STATS_TTL``, forgotten as soon
        as one of the owner's earnings or withdrawals commits. ``shape`` turns the figures
        into what is cached (JSON-ready)."""

        async def load() -> Any:
            # Its own read session: the cache may run this after the request (background
            # refresh of a stale entry), when a request-scoped session would be closed.
            async with runtime.db.read_session() as session:
                return shape(await self.stats(session, runtime, owner_id))

        return await runtime.cache.get_or_load(
            stats_key(owner_id), load, ttl=runtime.settings.WALLET_STATS_TTL.total_seconds()
        )

    async def refresh_stats(self, session: AsyncSession) -> bool:
        """``REFRESH MATERIALIZED VIEW CONCURRENTLY wallet_stats``, one process at a time
        (transaction-scoped advisory lock); readers are never blocked."""
        return await repository.refresh_stats_view(session, STATS_LOCK)

    async def ensure_partitions(self, session: AsyncSession, runtime: Runtime) -> int:
        """Create this month's and the next months' history partitions (idempotent)."""
        return await repository.ensure_partitions(
            session, runtime.settings.WALLET_PARTITION_MONTHS_AHEAD
        )


wallet = WalletService(ledger)
