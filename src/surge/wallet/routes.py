"""Wallet HTTP API (ARCHITECTURE §5): the partner's wallet, history, stats, withdrawals and
earnings; revenue events; admin decisions on withdrawals.

Routes stay thin: authenticate, pick the session (primary for money and real-time balance,
read session — a replica when configured — for history), call the service with the acting
user's id (ownership is enforced there), shape the reply. Money-moving POSTs accept an
``Idempotency-Key`` (``surge.kit.web.idempotency``).
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from surge.config import Settings
from surge.identity.deps import AdminMfa, IdentityDep, require_role
from surge.identity.service import Principal, audit
from surge.kit.errors import UnprocessableEntity
from surge.kit.web.cursor import bigint, decode_cursor, moment
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep
from surge.kit.web.idempotency import idempotency_keys
from surge.models.wallet import Withdrawal
from surge.wallet import repository
from surge.wallet.schemas import (
    AdminWithdrawalPage,
    AdminWithdrawalRead,
    BatchApproveCreate,
    BatchApproveRead,
    BatchItemRead,
    DecisionCreate,
    EarningPage,
    EarningRead,
    EntryPage,
    EntryRead,
    PartnerRead,
    PartnerTerms,
    RevenueEventCreate,
    RevenueEventRead,
    StatsRead,
    WalletRead,
    WithdrawalCreate,
    WithdrawalPage,
    WithdrawalRead,
)
from surge.wallet.service import changed_owners, stats_key
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
Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=200)]


def _invalidate_after_commit(runtime: RuntimeDep, session: AsyncSession) -> None:
    owners = changed_owners(session)
    if owners:
        runtime.cache.invalidate_on_commit(session, keys=[stats_key(o) for o in owners])


def _withdrawal(row: Withdrawal) -> dict[str, object]:
    return WithdrawalRead.model_validate(row).model_dump(mode="json")


# ---- partner ------------------------------------------------------------------------------
@router.get("/wallet", response_model=WalletRead)
async def get_wallet(principal: Owner, session: SessionDep) -> WalletRead:
    """Real-time balance, read on the primary (a replica could lag behind a payout)."""
    balance = await wallet_service.balance(session, principal.user_id)
    if balance is None:
        return WalletRead(
            currency=wallet_service.currency, balance=0, available=0, pending_withdrawals=0
        )
    return WalletRead(
        currency=balance.currency,
        balance=balance.balance,
        available=balance.available,
        pending_withdrawals=balance.pending_out,
    )


@router.get("/wallet/transactions", response_model=EntryPage)
async def list_transactions(
    principal: Owner, session: ReadSessionDep, limit: Limit = 50, cursor: Cursor = None
) -> EntryPage:
    """Wallet history, newest first, each movement with the balance before and after."""
    account = await wallet_service.ledger.wallet_of(
        session, principal.user_id, currency=wallet_service.currency
    )
    if account is None:
        if cursor:
            decode_cursor(cursor, moment, bigint)  # a forged cursor is a 400, wallet or not
        return EntryPage(items=[], next_cursor=None)
    rows, next_cursor = await repository.entries(session, account, limit=limit, cursor=cursor)
    return EntryPage(
        items=[EntryRead.model_validate(row._mapping) for row in rows], next_cursor=next_cursor
    )


@router.get("/wallet/stats", response_model=StatsRead)
async def get_stats(principal: Owner, runtime: RuntimeDep) -> StatsRead:
    """Dashboard figures, cached ``WALLET_STATS_TTL`` and forgotten as soon as one of the
    partner's earnings or withdrawals commits."""

    async def load() -> dict[str, object]:
        # Its own read session: the cache may run this after the request (background
        # refresh of a stale entry), when a request-scoped session would be closed.
        async with runtime.db.read_session() as session:
            figures = await wallet_service.stats(session, principal.user_id)
        return StatsRead.model_validate(figures).model_dump(mode="json")

    cached = await runtime.cache.get_or_load(
        stats_key(principal.user_id),
        load,
        ttl=wallet_service.settings.WALLET_STATS_TTL.total_seconds(),
    )
    return StatsRead.model_validate(cached)


@router.post(
    "/withdrawals",
    status_code=201,
    response_model=WithdrawalRead,
    responses={422: {"description": "Invalid amount, or Idempotency-Key reused"}},
)
async def request_withdrawal(
    body: WithdrawalCreate,
    request: Request,
    principal: Owner,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    """Reserve ``amount`` for a payout; an admin approves or rejects it."""

    async def handler() -> Response:
        withdrawal = await wallet_service.request_withdrawal(
            session, principal.user_id, amount=body.amount
        )
        _invalidate_after_commit(runtime, session)
        return JSONResponse(_withdrawal(withdrawal), status_code=201)

    return await idempotency_keys.run(
        request, session, scope=f"user:{principal.user_id}", handler=handler
    )


@router.get("/withdrawals", response_model=WithdrawalPage)
async def list_withdrawals(
    principal: Owner, session: ReadSessionDep, limit: Limit = 50, cursor: Cursor = None
) -> WithdrawalPage:
    rows, next_cursor = await repository.withdrawals(
        session, principal.user_id, limit=limit, cursor=cursor
    )
    return WithdrawalPage(
        items=[WithdrawalRead.model_validate(row._mapping) for row in rows],
        next_cursor=next_cursor,
    )


@router.get("/withdrawals/{withdrawal_id}", response_model=WithdrawalRead)
async def get_withdrawal(
    withdrawal_id: UUID, principal: Owner, session: SessionDep
) -> WithdrawalRead:
    """The caller's withdrawal; another partner's answers 404, exactly like a missing one."""
    found = await wallet_service.withdrawal(session, principal.user_id, withdrawal_id)
    return WithdrawalRead.model_validate(found)


@router.get("/earnings", response_model=EarningPage)
async def list_earnings(
    principal: Owner, session: ReadSessionDep, limit: Limit = 50, cursor: Cursor = None
) -> EarningPage:
    """The partner's earnings: its shown profit per event, never the event's real profit."""
    rows, next_cursor = await repository.earnings(
        session, principal.user_id, limit=limit, cursor=cursor
    )
    return EarningPage(
        items=[EarningRead.model_validate(row._mapping) for row in rows], next_cursor=next_cursor
    )


# ---- revenue events (the platform's backend: an admin with MFA) -----------------------------
@router.post(
    "/revenue-events",
    status_code=201,
    response_model=RevenueEventRead,
    responses={200: {"model": RevenueEventRead, "description": "Already recorded: a replay"}},
)
async def record_revenue_event(
    body: RevenueEventCreate, principal: AdminMfa, session: SessionDep
) -> Response:
    """Record a game or sale once (201; its id again: 200 and nothing more happens). Every
    active partner is credited by jobs enqueued in this same transaction."""
    event, created = await wallet_service.record_revenue_event(
        session, event_id=body.id, kind=body.kind, profit=body.profit, occurred_at=body.occurred_at
    )
    payload = RevenueEventRead(
        id=event.id, kind=event.kind, profit=event.profit, currency=event.currency,
        occurred_at=event.occurred_at, created=created,
    )  # fmt: skip
    return JSONResponse(payload.model_dump(mode="json"), status_code=201 if created else 200)


# ---- admin --------------------------------------------------------------------------------
@admin_router.put("/partners/{owner_id}", response_model=PartnerRead)
async def set_partner_terms(
    owner_id: UUID,
    body: PartnerTerms,
    *,
    admin: AdminMfa,
    session: SessionDep,
    request: Request,
    identity: IdentityDep,
) -> PartnerRead:
    """Set a partner's share and commission (and open its wallet); audited. The user must
    exist (404 otherwise) and hold the partner or reseller role (422 otherwise)."""
    user = await identity.get_user(session, owner_id)
    if user.role not in {"partner", "reseller"}:
        raise UnprocessableEntity("Only partners and resellers have commercial terms.")
    partner = await wallet_service.set_partner(
        session, owner_id, share_bps=body.share_bps, commission_bps=body.commission_bps,
        active=body.active,
    )  # fmt: skip
    await audit(
        session, admin.user_id, action="wallet.partner.terms", subject_type="user",
        subject_id=str(owner_id), after=body.model_dump(),
        request_id=getattr(request.state, "request_id", None),
    )  # fmt: skip
    return PartnerRead.model_validate(partner)


@admin_router.get("/withdrawals", response_model=AdminWithdrawalPage)
async def list_withdrawals_to_decide(
    admin: AdminMfa,
    session: ReadSessionDep,
    status: Literal["pending", "approved", "rejected"] = "pending",
    limit: Limit = 50,
    cursor: Cursor = None,
) -> AdminWithdrawalPage:
    """The approval queue (oldest first), or the decided ones by status."""
    rows, next_cursor = await repository.withdrawals_by_status(
        session, status, limit=limit, cursor=cursor
    )
    return AdminWithdrawalPage(
        items=[AdminWithdrawalRead.model_validate(row._mapping) for row in rows],
        next_cursor=next_cursor,
    )


async def _decide(
    session: AsyncSession,
    runtime: RuntimeDep,
    request: Request,
    admin: Principal,
    withdrawal_id: UUID,
    *,
    approve: bool,
    reason: str | None = None,
) -> Withdrawal:
    withdrawal, changed = await wallet_service.decide(
        session, admin.user_id, withdrawal_id, approve=approve, reason=reason
    )
    if not changed:  # the same decision again: nothing happened, nothing to audit
        return withdrawal
    await audit(
        session, admin.user_id,
        action="wallet.withdrawal.approve" if approve else "wallet.withdrawal.reject",
        subject_type="withdrawal", subject_id=str(withdrawal_id),
        after={"status": withdrawal.status, "amount": withdrawal.amount, "reason": reason},
        request_id=getattr(request.state, "request_id", None),
    )  # fmt: skip
    _invalidate_after_commit(runtime, session)
    return withdrawal


@admin_router.post("/withdrawals/{withdrawal_id}/approve", response_model=WithdrawalRead)
async def approve_withdrawal(
    withdrawal_id: UUID, admin: AdminMfa, session: SessionDep, runtime: RuntimeDep, request: Request
) -> WithdrawalRead:
    """Post the reservation and move it to payouts; audited; the partner is notified."""
    found = await _decide(session, runtime, request, admin, withdrawal_id, approve=True)
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
    found = await _decide(
        session, runtime, request, admin, withdrawal_id, approve=False,
        reason=body.reason if body else None,
    )  # fmt: skip
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
    approved or why not; a failing item never fails the others. Each approval is audited."""
    results = await wallet_service.batch_approve(session, admin.user_id, body.ids)
    for item in results:
        if item.changed:
            await audit(
                session, admin.user_id, action="wallet.withdrawal.approve",
                subject_type="withdrawal", subject_id=str(item.id),
                after={"status": item.status, "batch": True},
                request_id=getattr(request.state, "request_id", None),
            )  # fmt: skip
    _invalidate_after_commit(runtime, session)
    approved = sum(1 for item in results if item.ok)
    return BatchApproveRead(
        results=[BatchItemRead.model_validate(item) for item in results],
        approved=approved,
        failed=len(results) - approved,
    )
