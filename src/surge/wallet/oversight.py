"""Which of an administrator's wallet actions wait for a second administrator (ADR 0059).

Each gate returns when the action may go ahead now and raises ``ApprovalPending`` (202)
after recording the request otherwise (``surge.audit.approvals``). The actions, once
approved, are carried out by ``surge.wallet.approved`` with the maker as the actor and the
approver as ``approved_by``:

- ``wallet.withdrawal.approve``: a payout above ``APPROVAL_THRESHOLD`` (single or batched);
- ``wallet.revenue_event.record``: an administrator's event whose profit is above it (a
  service key's events are the platform's own feed: not gated);
- ``wallet.partner.terms``: active terms whose effective rate (share × commission) is above
  ``APPROVAL_TERMS_BPS`` (lowering terms or deactivating a partner never waits);
- ``wallet.debt.write_off``: always (``surge.wallet.approved``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.approvals import approvals
from surge.kit.runtime import Runtime
from surge.models.wallet import Withdrawal
from surge.wallet import repository
from surge.wallet.values import BPS

PAYOUT = "wallet.withdrawal.approve"
REVENUE_EVENT = "wallet.revenue_event.record"
TERMS = "wallet.partner.terms"
WRITE_OFF = "wallet.debt.write_off"


def approved(approved_by: UUID | None) -> dict[str, Any]:
    """What an audit row adds when a second administrator approved the action."""
    return {} if approved_by is None else {"approved_by": str(approved_by)}


async def gate_payout(
    session: AsyncSession, runtime: Runtime, admin_id: UUID, withdrawal: Withdrawal, *,
    approved_by: UUID | None, request_id: str | None,
) -> None:  # fmt: skip
    await approvals.gate(
        session, runtime, admin_id, action=PAYOUT, subject_type="withdrawal",
        subject_id=str(withdrawal.id), amount=withdrawal.amount, currency=withdrawal.currency,
        params={}, approved_by=approved_by, request_id=request_id,
    )  # fmt: skip


async def gate_batch_item(
    session: AsyncSession, runtime: Runtime, admin_id: UUID, withdrawal_id: UUID, *,
    request_id: str | None,
) -> None:  # fmt: skip
    """A batch's item, before its savepoint (its row is locked already)."""
    withdrawal = await repository.withdrawal_for_update(session, withdrawal_id)
    if withdrawal is not None and withdrawal.status == "pending":
        await gate_payout(
            session, runtime, admin_id, withdrawal, approved_by=None, request_id=request_id
        )


async def gate_terms(
    session: AsyncSession, runtime: Runtime, admin_id: UUID, owner_id: UUID, *,
    share_bps: int, commission_bps: int | None, active: bool, approved_by: UUID | None,
    request_id: str | None,
) -> None:  # fmt: skip
    commission = (
        runtime.settings.WALLET_COMMISSION_BPS if commission_bps is None else commission_bps
    )
    if not active or share_bps * commission // BPS <= runtime.settings.APPROVAL_TERMS_BPS:
        return
    await approvals.gate(
        session, runtime, admin_id, action=TERMS, subject_type="user", subject_id=str(owner_id),
        amount=0, currency=None, always=True, approved_by=approved_by, request_id=request_id,
        params={"share_bps": share_bps, "commission_bps": commission_bps, "active": active},
    )  # fmt: skip


async def gate_revenue_event(
    session: AsyncSession, runtime: Runtime, admin_id: UUID, *, event_id: str, kind: str,
    profit: int, occurred_at: datetime | None, approved_by: UUID | None,
    request_id: str | None,
) -> None:  # fmt: skip
    """Before the event is inserted; a replay of a recorded event answers as before (and is
    not counted again against the administrator's solo budget)."""
    if approved_by is not None:
        return
    if await repository.revenue_event(session, event_id) is not None:
        return
    await approvals.gate(
        session, runtime, admin_id, action=REVENUE_EVENT, subject_type="revenue_event",
        subject_id=event_id, amount=profit, currency=runtime.settings.WALLET_CURRENCY,
        approved_by=None, request_id=request_id,
        params={"kind": kind, "profit": profit,
                "occurred_at": occurred_at.isoformat() if occurred_at else None},
    )  # fmt: skip
