"""The wallet's four-eyes actions carried out once a second administrator approved them, and
the debt write-off (ADR 0059). Registered with ``surge.audit.approvals`` on import (the
wallet's routes import this module).

A debt write-off (ADR 0042 left it to build) forgives what a wallet owes the platform, in
one transaction, through the ledger: ``bad_debt → wallet`` then ``wallet → receivables``
for the amount, both under the approval's id as key (once, whatever retries). The wallet's
balance ends where it was, its ``debt`` drops by the amount, receivables is repaid, and the
platform's loss shows on ``bad_debt``. It is always a four-eyes action: the administrator
who asks is never the one who carries it out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.approvals import approvals
from surge.audit.service import audit as audit_service
from surge.kit.runtime import Runtime
from surge.models.audit import AdminApproval
from surge.wallet import oversight
from surge.wallet.accounts import SystemAccount
from surge.wallet.errors import NothingToWriteOff, NoWallet
from surge.wallet.service import changed_owners
from surge.wallet.service import wallet as wallet_service

log = structlog.get_logger()


async def request_write_off(
    session: AsyncSession, runtime: Runtime, admin_id: UUID, owner_id: UUID, *,
    amount: int | None, reason: str, request_id: str | None = None,
) -> None:  # fmt: skip
    """Record an administrator's request to write off ``amount`` (default: all) of the
    owner's debt; always raises ``ApprovalPending`` (202) once recorded."""
    ledger = wallet_service.ledger
    currency = wallet_service.currency(runtime)
    account = await ledger.wallet_of(session, owner_id, currency=currency)
    if account is None:
        raise NoWallet(f"no {currency} wallet for {owner_id}")
    debt = (await ledger.balance(session, account)).debt
    if debt <= 0:
        raise NothingToWriteOff("This wallet owes nothing.", extra={"debt": 0})
    amount = debt if amount is None else amount
    if amount > debt:
        raise NothingToWriteOff(
            f"The wallet owes {debt}, less than {amount}.", extra={"debt": debt}
        )
    await approvals.gate(
        session, runtime, admin_id, action=oversight.WRITE_OFF, subject_type="user",
        subject_id=str(owner_id), amount=amount, currency=currency, always=True,
        params={"amount": amount, "reason": reason}, reason=reason, approved_by=None,
        request_id=request_id,
    )  # fmt: skip


async def write_off(
    session: AsyncSession, runtime: Runtime, approval: AdminApproval, checker_id: UUID,
    request_id: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Carry an approved write-off out: at most what the wallet owes now."""
    ledger = wallet_service.ledger
    owner_id, currency = UUID(approval.subject_id), approval.currency or ""
    account = await ledger.wallet_of(session, owner_id, currency=currency)
    if account is None:
        raise NoWallet(f"no {currency} wallet for {owner_id}")
    loss = await ledger.system_account(session, SystemAccount.bad_debt, currency=currency)
    receivables = await ledger.system_account(session, SystemAccount.receivables, currency=currency)
    await ledger.lock(session, [account, loss])  # receivables last (ADR 0042's lock order)
    debt = (await ledger.balance(session, account)).debt
    amount = min(int(approval.params["amount"]), debt)
    if amount > 0:
        key, reference = f"debt-write-off:{approval.id}", str(approval.id)
        await ledger.transfer(
            session, key=f"{key}:loss", debit=loss, credit=account, amount=amount,
            currency=currency, kind="debt_write_off", reference=reference,
        )  # fmt: skip
        await ledger.transfer(
            session, key=f"{key}:repay", debit=account, credit=receivables, amount=amount,
            currency=currency, kind="debt_write_off", reference=reference,
        )  # fmt: skip
        changed_owners(session).add(owner_id)
        wallet_service.invalidate_after_commit(session, runtime)
    await audit_service.record(
        session, approval.maker_id, action=oversight.WRITE_OFF, subject_type="user",
        subject_id=str(owner_id), before={"debt": debt},
        after={"debt": debt - amount, "written_off": amount, "currency": currency,
               "reason": approval.params.get("reason"), **oversight.approved(checker_id)},
        request_id=request_id,
    )  # fmt: skip
    log.info("wallet.debt.written_off", owner_id=str(owner_id), amount=amount)
    return {"written_off": amount, "debt_before": debt}


async def _payout(
    session: AsyncSession, runtime: Runtime, approval: AdminApproval, checker_id: UUID,
    request_id: str | None,
) -> dict[str, Any]:  # fmt: skip
    withdrawal, changed = await wallet_service.decide(
        session, runtime, approval.maker_id, UUID(approval.subject_id), approve=True,
        approved_by=checker_id, request_id=request_id,
    )  # fmt: skip
    wallet_service.invalidate_after_commit(session, runtime)
    return {"status": withdrawal.status, "changed": changed}


async def _terms(
    session: AsyncSession, runtime: Runtime, approval: AdminApproval, checker_id: UUID,
    request_id: str | None,
) -> dict[str, Any]:  # fmt: skip
    params = approval.params
    await wallet_service.set_partner_terms(
        session, runtime, approval.maker_id, UUID(approval.subject_id),
        share_bps=int(params["share_bps"]), commission_bps=params["commission_bps"],
        active=bool(params["active"]), approved_by=checker_id, request_id=request_id,
    )  # fmt: skip
    return {"share_bps": params["share_bps"], "commission_bps": params["commission_bps"]}


async def _revenue_event(
    session: AsyncSession, runtime: Runtime, approval: AdminApproval, checker_id: UUID,
    request_id: str | None,
) -> dict[str, Any]:  # fmt: skip
    params = approval.params
    occurred = params.get("occurred_at")
    _, created = await wallet_service.record_revenue_event(
        session, runtime, event_id=approval.subject_id, kind=str(params["kind"]),
        profit=int(params["profit"]),
        occurred_at=datetime.fromisoformat(occurred) if occurred else None,
        admin_id=approval.maker_id, approved_by=checker_id, request_id=request_id,
    )  # fmt: skip
    return {"created": created}


approvals.register(oversight.PAYOUT, _payout)
approvals.register(oversight.TERMS, _terms)
approvals.register(oversight.REVENUE_EVENT, _revenue_event)
approvals.register(oversight.WRITE_OFF, write_off)
