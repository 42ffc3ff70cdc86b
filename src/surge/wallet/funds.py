"""Money other domains move through an owner's wallet: the wallet's service for them.

Operations reserve an owner's credit before work is done, then settle or release it
(two-phase, TigerBeetle's pattern); payments credit a wallet with money that came in from
the provider, and reverse it on a refund or a dispute. A reversal always posts: what the
wallet cannot cover is advanced by the receivables account and owed (the wallet's
``debt``, ADR 0042); every credit and every release then repays the debt first. Every call
is idempotent by the key
the caller gives — the same key twice moves money once (``Posted.created`` says which) —
and runs in the caller's transaction (it flushes, never commits).

    from surge.wallet.funds import funds as funds_service

    hold = await funds_service.reserve(session, owner_id, amount=1_500, currency="EUR",
                                       key=f"op:{op.id}:reserve", kind="operation")
    ...
    await funds_service.settle(session, hold, key=f"op:{op.id}:settle", kind="operation")
"""

from __future__ import annotations

from uuid import UUID

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.wallet import repository
from surge.wallet.accounts import SystemAccount
from surge.wallet.ledger import Balance, Ledger, Posted, ledger
from surge.wallet.service import changed_owners

log = structlog.get_logger()


class FundsService:
    """Stateless; see the module docstring."""

    def __init__(self, ledger_: Ledger) -> None:
        self.ledger = ledger_

    async def available(self, session: AsyncSession, owner_id: UUID, *, currency: str) -> int:
        """What ``owner_id`` may still spend in ``currency``: available minus its debt (0
        without a wallet)."""
        account = await self.ledger.wallet_of(session, owner_id, currency=currency)
        if account is None:
            return 0
        balance: Balance = await self.ledger.balance(session, account)
        return balance.spendable

    async def moved(self, session: AsyncSession, *, key: str) -> int | None:
        """The amount already moved under idempotency ``key`` (None: nothing yet) — for a
        caller that must size its next movement by what its earlier ones did."""
        return await repository.moved_under(session, key)

    async def reserve(
        self,
        session: AsyncSession,
        owner_id: UUID,
        *,
        amount: int,
        currency: str,
        key: str,
        kind: str,
        reference: str | None = None,
    ) -> int:
        """Reserve ``amount`` of the owner's wallet for the platform's sales account; returns
        the pending transfer's id. ``InsufficientFunds`` (409) when the wallet lacks it."""
        _, posted = await self._move(
            session, owner_id, SystemAccount.sales, to_owner=False, amount=amount,
            currency=currency, key=key, kind=kind, reference=reference, pending=True,
        )  # fmt: skip
        return posted.transfer_id

    async def settle(self, session: AsyncSession, hold_id: int, *, key: str, kind: str) -> Posted:
        """The reserved amount moves for good (the work was done)."""
        return await self.ledger.post(session, key=key, pending_id=hold_id, kind=kind)

    async def release(self, session: AsyncSession, hold_id: int, *, key: str, kind: str) -> Posted:
        """The reservation is dropped (the work was not done); nothing is charged. Money it
        frees repays the owner's debt first."""
        posted = await self.ledger.void(session, key=key, pending_id=hold_id, kind=kind)
        if posted.created:
            await self.ledger.collect_released(session, hold_id, key=f"{key}:debt", reference=key)
        return posted

    async def credit(
        self,
        session: AsyncSession,
        owner_id: UUID,
        *,
        amount: int,
        currency: str,
        key: str,
        kind: str,
        reference: str | None = None,
    ) -> Posted:
        """Money that came in through the payment provider, credited to the owner's wallet;
        it repays the owner's debt first (ADR 0042)."""
        wallet, posted = await self._move(
            session, owner_id, SystemAccount.payments, to_owner=True, amount=amount,
            currency=currency, key=key, kind=kind, reference=reference,
        )  # fmt: skip
        if posted.created:
            await self.ledger.collect(session, wallet, key=f"{key}:debt", reference=reference)
        return posted

    async def reverse(
        self,
        session: AsyncSession,
        owner_id: UUID,
        *,
        amount: int,
        currency: str,
        key: str,
        kind: str,
        reference: str | None = None,
    ) -> Posted:
        """Take back money credited by ``credit`` (a refund, a lost dispute), always in full:
        the provider has taken it back already. What the wallet's available balance cannot
        cover (the owner spent it, or it is reserved) is first advanced by the receivables
        account under ``<key>:advance`` and becomes the wallet's ``debt`` (ADR 0042).

        The wallet and payments rows are locked (id order) before the wallet is read, so the
        shortfall is exact; receivables is locked last. Idempotent by ``key``: a replay finds
        the reversal posted and moves nothing (it is not sized again)."""
        wallet = await self.ledger.open_wallet(session, owner_id, currency=currency)
        payments = await self.ledger.system_account_for(
            session, SystemAccount.payments, owner_id, currency=currency
        )
        await self.ledger.lock(session, [wallet, payments])
        done = await repository.moved_under(session, key)
        if done is None:
            shortfall = amount - max(0, (await self.ledger.balance(session, wallet)).available)
            if shortfall > 0:
                receivables = await self.ledger.system_account(
                    session, SystemAccount.receivables, currency=currency
                )
                await self.ledger.transfer(
                    session, key=f"{key}:advance", debit=receivables, credit=wallet,
                    amount=shortfall, currency=currency, kind="debt", reference=reference,
                )  # fmt: skip
                log.warning(
                    "wallet.debt.incurred", owner_id=str(owner_id), amount=shortfall, key=key
                )
        _, posted = await self._move(
            session, owner_id, SystemAccount.payments, to_owner=False, amount=amount,
            currency=currency, key=key, kind=kind, reference=reference,
        )  # fmt: skip
        return posted

    async def _move(
        self,
        session: AsyncSession,
        owner_id: UUID,
        system: SystemAccount,
        *,
        to_owner: bool,
        amount: int,
        currency: str,
        key: str,
        kind: str,
        reference: str | None,
        pending: bool = False,
    ) -> tuple[int, Posted]:
        """One transfer between the owner's wallet and a system account (either way), and
        the owner marked changed so the edge invalidates its cached stats. Returns (wallet
        id, outcome)."""
        wallet = await self.ledger.open_wallet(session, owner_id, currency=currency)
        # The owner's stripe of a striped account (payments, ADR 0058); the one row otherwise.
        other = await self.ledger.system_account_for(session, system, owner_id, currency=currency)
        debit, credit = (other, wallet) if to_owner else (wallet, other)
        posted = await self.ledger.transfer(
            session, key=key, debit=debit, credit=credit, amount=amount, currency=currency,
            kind=kind, reference=reference, pending=pending,
        )  # fmt: skip
        changed_owners(session).add(owner_id)
        return wallet, posted


funds = FundsService(ledger)
