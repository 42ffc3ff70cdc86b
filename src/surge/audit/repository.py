"""The audit log's queries, and the four-eyes requests' (ADR 0059)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, literal, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.web.cursor import bigint, moment
from surge.kit.web.pagination import Keyset, Slice, keyset_page
from surge.models.audit import AdminApproval, AdminSoloAction, AuditEntry

NEWEST_FIRST = Keyset((AuditEntry.id,), (bigint,), descending=True)


async def add(
    session: AsyncSession,
    actor_id: uuid.UUID | None,
    *,
    action: str,
    subject_type: str,
    subject_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    request_id: str | None,
) -> None:
    session.add(
        AuditEntry(
            actor_id=actor_id,
            action=action,
            subject_type=subject_type,
            subject_id=subject_id,
            before=before,
            after=after,
            request_id=request_id,
        )
    )
    await session.flush()


async def page(
    session: AsyncSession,
    *,
    subject_type: str | None,
    subject_id: str | None,
    limit: int,
    cursor: str | None,
) -> Slice[AuditEntry]:
    statement = select(AuditEntry)
    if subject_type is not None:
        statement = statement.where(AuditEntry.subject_type == subject_type)
    if subject_id is not None:
        statement = statement.where(AuditEntry.subject_id == subject_id)
    return await keyset_page(
        session, statement, NEWEST_FIRST, limit=limit, cursor=cursor, scalars=True
    )


# ---- four-eyes requests (ADR 0059) --------------------------------------------------------
OLDEST_FIRST = Keyset((AdminApproval.created_at, AdminApproval.id), (moment, uuid.UUID))


async def insert_pending(
    session: AsyncSession,
    *,
    action: str,
    subject_type: str,
    subject_id: str,
    amount: int,
    currency: str | None,
    params: dict[str, Any],
    maker_id: uuid.UUID,
    reason: str | None,
    ttl_seconds: float,
) -> AdminApproval | None:
    """A new pending request, or None when one is already pending for this action and
    subject (``uq_admin_approvals_pending``: concurrent makers cannot queue two)."""
    statement = (
        insert(AdminApproval)
        .values(
            id=uuid.uuid4(), action=action, subject_type=subject_type, subject_id=subject_id,
            amount=amount, currency=currency, params=params, maker_id=maker_id, reason=reason,
            expires_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, ttl_seconds),
        )
        .on_conflict_do_nothing(
            index_elements=["action", "subject_id"], index_where=text("status = 'pending'")
        )
        .returning(AdminApproval)
    )  # fmt: skip
    return (await session.execute(statement)).scalar_one_or_none()


async def spend_alone(
    session: AsyncSession,
    *,
    maker_id: uuid.UUID,
    action: str,
    subject_id: str,
    amount: int,
    currency: str,
    budget: int,
    window_seconds: float,
) -> int | None:
    """Count ``amount`` against what ``maker_id`` moved alone in ``currency`` over the last
    ``window_seconds`` (ADR 0066), in the caller's transaction: None when it fits (recorded,
    once per maker, action and subject: a retried action is not counted twice), else what
    the maker already moved alone in the window (nothing recorded).

    One maker's solo actions are serialised on a transaction-level advisory lock taken
    before the sum, so two concurrent actions cannot both see room for one."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended('surge.solo:' || :maker, 0))"),
        {"maker": str(maker_id)},
    )
    spent = int(
        (
            await session.execute(
                select(func.coalesce(func.sum(AdminSoloAction.amount), 0)).where(
                    AdminSoloAction.maker_id == maker_id,
                    AdminSoloAction.currency == currency,
                    AdminSoloAction.at
                    > func.now() - func.make_interval(0, 0, 0, 0, 0, 0, window_seconds),
                    # the same action on the same subject again is the one already counted
                    ~((AdminSoloAction.action == action)
                      & (AdminSoloAction.subject_id == subject_id)),
                )
            )
        ).scalar_one()
    )  # fmt: skip
    if spent + amount > budget:
        return spent
    await session.execute(
        insert(AdminSoloAction)
        .values(maker_id=maker_id, action=action, subject_id=subject_id, amount=amount,
                currency=currency)
        .on_conflict_do_nothing(index_elements=["maker_id", "action", "subject_id"])
    )  # fmt: skip
    return None


async def pending_for(
    session: AsyncSession, *, action: str, subject_id: str
) -> AdminApproval | None:
    """The pending request for this action and subject, locked."""
    return (
        await session.execute(
            select(AdminApproval)
            .where(
                AdminApproval.action == action,
                AdminApproval.subject_id == subject_id,
                AdminApproval.status == "pending",
            )
            .with_for_update()
        )
    ).scalar_one_or_none()


async def approval_for_update(
    session: AsyncSession, approval_id: uuid.UUID
) -> AdminApproval | None:
    return (
        await session.execute(
            select(AdminApproval).where(AdminApproval.id == approval_id).with_for_update()
        )
    ).scalar_one_or_none()


async def approval(session: AsyncSession, approval_id: uuid.UUID) -> AdminApproval | None:
    return await session.get(AdminApproval, approval_id)


async def is_expired(session: AsyncSession, approval: AdminApproval) -> bool:
    """On the database clock, like the expiry was set."""
    return bool(
        (await session.execute(select(func.now() >= literal(approval.expires_at)))).scalar_one()
    )


async def approvals(
    session: AsyncSession, *, status: str, limit: int, cursor: str | None
) -> Slice[AdminApproval]:
    """Oldest first; ``pending`` means still answerable (not past its expiry)."""
    statement = select(AdminApproval).where(AdminApproval.status == status)
    if status == "pending":
        statement = statement.where(AdminApproval.expires_at > func.now())
    return await keyset_page(
        session, statement, OLDEST_FIRST, limit=limit, cursor=cursor, scalars=True
    )
