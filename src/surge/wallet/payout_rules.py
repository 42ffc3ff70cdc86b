"""What a withdrawal request must pass before anything is reserved — every rule in one
place, read with the wallet's row already locked (the caller locks wallet and holds in the
ledger's order), so no concurrent posting or request can change a figure between the check
and the reservation:

1. a wallet in debt withdraws nothing (ADR 0042): ``WalletInDebt``;
2. top-up credit is never paid out (ADR 0033, 0045): ``NotWithdrawable``;
3. at most ``WALLET_WITHDRAWAL_DAILY_MAX`` in any 24 hours, pending and approved requests
   together (ADR 0051): ``WithdrawalLimitReached``.

Beyond ``available`` the ledger itself refuses (``InsufficientFunds``).
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from surge.config import Settings
from surge.wallet import repository
from surge.wallet.errors import NotWithdrawable, WithdrawalLimitReached
from surge.wallet.ledger import Balance, Ledger, WalletInDebt

#: The rolling window of ``WALLET_WITHDRAWAL_DAILY_MAX``: rolling, so a request at 23:59
#: and another at 00:01 share one budget (a calendar day would allow twice the cap).
WINDOW = timedelta(hours=24)


async def withdrawable(session: AsyncSession, ledger: Ledger, wallet: int) -> tuple[Balance, int]:
    """(balance, withdrawable): available minus the top-up credit still in the wallet.
    Posted purchases spend top-up credit first, but only credit already there: a later
    top-up is not absorbed by earlier purchases paid with earnings (ADR 0045). One still
    reserved does not count yet (stricter for the seconds an operation runs, never
    looser). The wallet row's running total, kept by the ledger's functions (ADR 0036,
    0045): O(1) whatever the wallet's history."""
    balance = await ledger.balance(session, wallet)
    if balance.debt > 0:  # a wallet in debt withdraws nothing (ADR 0042)
        return balance, 0
    unspent = await repository.topup_unspent(session, wallet)
    return balance, balance.available - unspent


async def check(
    session: AsyncSession,
    settings: Settings,
    ledger: Ledger,
    owner_id: UUID,
    wallet: int,
    *,
    amount: int,
) -> None:
    """Raise the first rule ``amount`` breaks (module docstring); the wallet row is locked."""
    balance, allowed = await withdrawable(session, ledger, wallet)
    if balance.debt > 0:
        raise WalletInDebt(
            "This wallet owes the platform for a reversed top-up: no withdrawal until "
            "the debt is repaid (top-ups and earnings repay it first).",
            extra={"debt": balance.debt, "withdrawable": 0},
        )
    if allowed < amount <= balance.available:  # beyond available: the ledger's 409
        raise NotWithdrawable(
            "Top-up credit buys operations and is never paid out; this wallet can "
            f"withdraw {max(allowed, 0)} minor units.",
            extra={"withdrawable": max(allowed, 0)},
        )
    cap = settings.WALLET_WITHDRAWAL_DAILY_MAX
    used = await repository.withdrawn_within(session, owner_id, window=WINDOW)
    if used + amount > cap:
        remaining = max(0, cap - used)
        raise WithdrawalLimitReached(
            f"At most {cap} minor units may be withdrawn in 24 hours; {remaining} remain.",
            extra={"limit": cap, "remaining": remaining},
        )
