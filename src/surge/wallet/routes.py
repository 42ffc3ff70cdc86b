"""Wallet HTTP API (docs/architecture.md): the partner's wallet, history, stats,
withdrawals and earnings; revenue events; admin decisions on withdrawals.

Routes stay thin: authenticate, pick the session (primary for money and real-time balance,
read session — a replica when configured — for history), call the service with the acting
user's id (ownership and auditing are enforced there), shape the reply. A partner's
money-moving POST requires an ``Idempotency-Key`` (``surge.kit.web.idempotency``; missing:
428); admin decisions are idempotent by state (ADR 0035). The admin router is mounted
by ``surge.admin.surface`` behind the admin guard.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from surge.audit.schemas import APPROVAL_PENDING_RESPONSE
from surge.config import Settings
from surge.credential.deps import Actor, service_or_admin
from surge.identity.deps import AdminMfa, require_role
from surge.identity.principal import Principal
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep, request_id
from surge.kit.web.idempotency import REQUIRED_HEADER_OPENAPI, idempotency_keys
from surge.kit.web.pagination import Cursor, Limit, Page
from surge.models.wallet import Withdrawal
from surge.wallet.approved import request_write_off
from surge.wallet.schemas import (
    AdminWithdrawalRead,
    BatchApproveCreate,
    BatchApproveRead,
    BatchItemRead,
    DecisionCreate,
    EarningRead,
    EntryRead,
    PartnerRead,
    PartnerTerms,
    RevenueEventCreate,
    RevenueEventRead,
    StatsRead,
    WalletRead,
    WithdrawalCreate,
    WithdrawalRead,
    WriteOffCreate,
)
from surge.wallet.service import wallet as wallet_service


def api_constraints(settings: Settings) -> dict[str, dict[str, dict[str, int]]]:
    """The bounds the service enforces, as the OpenAPI document must state them (issue 16:
    the schema said ``0 < amount ≤ 9.2e18`` while the server took 1 000–1 000 000)."""
    return {
        "WithdrawalCreate": {
            "amount": {
                "minimum": settings.WALLET_WITHDRAWAL_MIN,
                "maximum": settings.WALLET_WITHDRAWAL_MAX,
            }
        }
    }


router = APIRouter(prefix="/api/v1", tags=["wallet"])
admin_router = APIRouter(prefix="/api/admin", tags=["wallet admin"])

Owner = Annotated[Principal, Depends(require_role("partner", "reseller"))]


def _withdrawal(row: Withdrawal) -> dict[str, object]:
    return WithdrawalRead.model_validate(row).model_dump(mode="json")


# ---- partner ------------------------------------------------------------------------------
@router.get("/wallet", response_model=WalletRead)
async def get_wallet(principal: Owner, session: SessionDep, runtime: RuntimeDep) -> WalletRead:
    """Real-time balance, read on the primary (a replica could lag behind a payout), and
    how much of it can be withdrawn."""
    found = await wallet_service.withdrawable(session, runtime, principal.user_id)
    if found is None:
        return WalletRead(
            currency=wallet_service.currency(runtime),
            balance=0,
            available=0,
            pending_withdrawals=0,
            withdrawable=0,
        )
    balance, withdrawable = found
    return WalletRead(
        currency=balance.currency,
        balance=balance.balance,
        available=balance.available,
        pending_withdrawals=balance.pending_out,
        withdrawable=withdrawable,
        debt=balance.debt,
        spendable=balance.spendable,
    )


@router.get("/wallet/transactions", response_model=Page[EntryRead])
async def list_transactions(
    principal: Owner,
    session: ReadSessionDep,
    runtime: RuntimeDep,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[EntryRead]:
    """Wallet history, newest posting first, each movement with the balance before and
    after (ordered by the ledger's entry sequence: the balance chain reads in order)."""
    found = await wallet_service.transactions(
        session, runtime, principal.user_id, limit=limit, cursor=cursor
    )
    return Page[EntryRead](
        items=[EntryRead.model_validate(row._mapping) for row in found.items],
        next_cursor=found.next_cursor,
    )


@router.get("/wallet/stats", response_model=StatsRead)
async def get_stats(principal: Owner, runtime: RuntimeDep) -> StatsRead:
    """Dashboard figures, cached ``WALLET_STATS_TTL`` and forgotten as soon as one of the
    partner's earnings or withdrawals commits."""

    def shape(figures: dict[str, Any]) -> dict[str, Any]:
        return StatsRead.model_validate(figures).model_dump(mode="json")

    cached = await wallet_service.cached_stats(runtime, principal.user_id, shape)
    return StatsRead.model_validate(cached)


@router.post(
    "/withdrawals",
    status_code=201,
    openapi_extra=REQUIRED_HEADER_OPENAPI,
    response_model=WithdrawalRead,
    responses={
        409: {
            "description": "Insufficient funds, not withdrawable (top-up credit), or the "
            "wallet is in debt (a reversed top-up it could not cover)"
        },
        422: {"description": "Invalid amount, or Idempotency-Key reused"},
        428: {"description": "Idempotency-Key missing: nothing was reserved"},
    },
)
async def request_withdrawal(
    body: WithdrawalCreate,
    request: Request,
    principal: Owner,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    """Reserve ``amount`` for a payout; an admin approves or rejects it. Requires an
    ``Idempotency-Key``: the same key names the same withdrawal for ever (ADR 0033)."""

    async def handler() -> Response:
        withdrawal = await wallet_service.request_withdrawal(
            session, runtime, principal.user_id, amount=body.amount,
            key=request.headers["Idempotency-Key"],
        )  # fmt: skip
        return JSONResponse(_withdrawal(withdrawal), status_code=201)

    return await idempotency_keys.run(
        request, session, scope=f"user:{principal.user_id}", handler=handler, required=True
    )


@router.get("/withdrawals", response_model=Page[WithdrawalRead])
async def list_withdrawals(
    principal: Owner, session: ReadSessionDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[WithdrawalRead]:
    found = await wallet_service.withdrawals(session, principal.user_id, limit=limit, cursor=cursor)
    return Page[WithdrawalRead](
        items=[WithdrawalRead.model_validate(row._mapping) for row in found.items],
        next_cursor=found.next_cursor,
    )


@router.get("/withdrawals/{withdrawal_id}", response_model=WithdrawalRead)
async def get_withdrawal(
    withdrawal_id: UUID, principal: Owner, session: SessionDep
) -> WithdrawalRead:
    """The caller's withdrawal; another partner's answers 404, exactly like a missing one."""
    found = await wallet_service.withdrawal(session, principal.user_id, withdrawal_id)
    return WithdrawalRead.model_validate(found)


@router.get("/earnings", response_model=Page[EarningRead])
async def list_earnings(
    principal: Owner, session: ReadSessionDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[EarningRead]:
    """The partner's earnings: its shown profit per event, never the event's real profit."""
    found = await wallet_service.earnings(session, principal.user_id, limit=limit, cursor=cursor)
    return Page[EarningRead](
        items=[EarningRead.model_validate(row._mapping) for row in found.items],
        next_cursor=found.next_cursor,
    )


# ---- revenue events (the platform's backend: a scoped service key, or an admin with MFA) ----
RevenueCaller = Annotated[Actor, Depends(service_or_admin("revenue-events:write"))]


@router.post(
    "/revenue-events",
    status_code=201,
    response_model=RevenueEventRead,
    responses={
        200: {"model": RevenueEventRead, "description": "Already recorded: a replay"},
        **APPROVAL_PENDING_RESPONSE,
    },
)
async def record_revenue_event(
    body: RevenueEventCreate,
    actor: RevenueCaller,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
) -> Response:
    """Record a game or sale once (201; its id again: 200 and nothing more happens). Every
    active partner is credited by jobs enqueued in this same transaction. Called by the
    platform's backend with a service key granted ``revenue-events:write`` (or by an MFA
    administrator: audited as ``wallet.revenue_event.record``)."""
    event, created = await wallet_service.record_revenue_event(
        session,
        runtime,
        event_id=body.id,
        kind=body.kind,
        profit=body.profit,
        occurred_at=body.occurred_at,
        admin_id=actor.user_id,  # an administrator's event is audited; a service key's not
        request_id=request_id(request),
    )
    payload = RevenueEventRead(
        id=event.id, kind=event.kind, profit=event.profit, currency=event.currency,
        occurred_at=event.occurred_at, created=created,
    )  # fmt: skip
    return JSONResponse(payload.model_dump(mode="json"), status_code=201 if created else 200)


# ---- admin --------------------------------------------------------------------------------
@admin_router.put(
    "/partners/{owner_id}", response_model=PartnerRead, responses=APPROVAL_PENDING_RESPONSE
)
async def set_partner_terms(
    owner_id: UUID,
    body: PartnerTerms,
    *,
    admin: AdminMfa,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
) -> PartnerRead:
    """Set a partner's share and commission (and open its wallet); audited. The user must
    exist (404 otherwise) and hold the partner or reseller role (422 otherwise)."""
    partner = await wallet_service.set_partner_terms(
        session, runtime, admin.user_id, owner_id, share_bps=body.share_bps,
        commission_bps=body.commission_bps, active=body.active, request_id=request_id(request),
    )  # fmt: skip
    return PartnerRead.model_validate(partner)


@admin_router.get("/withdrawals", response_model=Page[AdminWithdrawalRead])
async def list_withdrawals_to_decide(
    admin: AdminMfa,
    session: ReadSessionDep,
    status: Literal["pending", "approved", "rejected"] = "pending",
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[AdminWithdrawalRead]:
    """The approval queue (oldest first), or the decided ones by status."""
    found = await wallet_service.withdrawals_by_status(session, status, limit=limit, cursor=cursor)
    return Page[AdminWithdrawalRead](
        items=[AdminWithdrawalRead.model_validate(row._mapping) for row in found.items],
        next_cursor=found.next_cursor,
    )


@admin_router.post(
    "/withdrawals/{withdrawal_id}/approve",
    response_model=WithdrawalRead,
    responses=APPROVAL_PENDING_RESPONSE,
)
async def approve_withdrawal(
    withdrawal_id: UUID, admin: AdminMfa, session: SessionDep, runtime: RuntimeDep, request: Request
) -> WithdrawalRead:
    """Post the reservation and move it to payouts; audited; the partner is notified.
    Above ``APPROVAL_THRESHOLD``: recorded for a second administrator (202, ADR 0059)."""
    found, _ = await wallet_service.decide(
        session,
        runtime,
        admin.user_id,
        withdrawal_id,
        approve=True,
        request_id=request_id(request),
    )
    wallet_service.invalidate_after_commit(session, runtime)
    return WithdrawalRead.model_validate(found)


@admin_router.post("/withdrawals/{withdrawal_id}/reject", response_model=WithdrawalRead)
async def reject_withdrawal(
    withdrawal_id: UUID,
    *,
    admin: AdminMfa,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
    body: DecisionCreate | None = None,
) -> WithdrawalRead:
    """Void the reservation (the funds are available again); audited; partner notified."""
    found, _ = await wallet_service.decide(
        session, runtime, admin.user_id, withdrawal_id, approve=False,
        reason=body.reason if body else None, request_id=request_id(request),
    )  # fmt: skip
    wallet_service.invalidate_after_commit(session, runtime)
    return WithdrawalRead.model_validate(found)


@admin_router.post("/withdrawals/batch-approve", response_model=BatchApproveRead)
async def batch_approve(
    body: BatchApproveCreate,
    admin: AdminMfa,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
) -> BatchApproveRead:
    """Approve up to 100 withdrawals, each in its own savepoint: the result says, per item,
    approved or why not; a failing item never fails the others. Each approval is audited
    like a single one (amount included). An item above ``APPROVAL_THRESHOLD`` is recorded
    for a second administrator (its code 202, ADR 0059)."""
    results = await wallet_service.batch_approve(
        session, runtime, admin.user_id, body.ids, request_id=request_id(request)
    )
    wallet_service.invalidate_after_commit(session, runtime)
    approved = sum(1 for item in results if item.ok)
    return BatchApproveRead(
        results=[BatchItemRead.model_validate(item) for item in results],
        approved=approved,
        failed=len(results) - approved,
    )


@admin_router.post(
    "/wallets/{owner_id}/debt-write-off",
    status_code=202,
    responses=APPROVAL_PENDING_RESPONSE,
    response_class=Response,
)
async def write_off_debt(
    owner_id: UUID,
    body: WriteOffCreate,
    *,
    admin: AdminMfa,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
) -> Response:
    """Ask to write off the owner's debt (``amount``, default all of it) to the platform's
    loss: always recorded for a second administrator (202 with the request), who carries it
    out at ``POST /api/admin/approvals/{id}/approve``. No debt, or more than it: 409."""
    await request_write_off(
        session, runtime, admin.user_id, owner_id, amount=body.amount, reason=body.reason,
        request_id=request_id(request),
    )  # fmt: skip
    return Response(status_code=202)  # not reached: the request always waits (ApprovalPending)
