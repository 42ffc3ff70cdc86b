"""Plain async factories for wallet tests (STYLE: functions with overrides)."""

from __future__ import annotations

from uuid import UUID, uuid4

from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.runtime import Runtime
from surge.wallet.accounts import SystemAccount
from surge.wallet.ledger import ledger
from surge.wallet.service import wallet as wallet_service


async def create_partner(
    session: AsyncSession, runtime: Runtime, *, share_bps: int = 4_000, commission_bps: int | None = None,
    active: bool = True, owner_id: UUID | None = None,
) -> UUID:  # fmt: skip
    owner = owner_id or uuid4()
    await wallet_service.set_partner(
        session, runtime, owner, share_bps=share_bps, commission_bps=commission_bps, active=active
    )
    return owner


async def fund(
    session: AsyncSession, owner_id: UUID, amount: int, *, currency: str = "USD"
) -> None:
    """Credit ``amount`` from the external account (an adjustment), keyed uniquely."""
    external = await ledger.system_account(session, SystemAccount.external, currency=currency)
    wallet = await ledger.open_wallet(session, owner_id, currency=currency)
    await ledger.transfer(
        session, key=f"fund:{uuid4()}", debit=external, credit=wallet, amount=amount,
        currency=currency, kind="adjustment",
    )  # fmt: skip
