"""Every query of the payments domain: top-ups and the provider-event inbox.

Listings are keyset-paginated with ``kit.web.pagination`` (newest first). Writers that race
(the request that created an intent, the job that read its webhook, the reconciliation poll)
all go through ``lock_topup``: ``INSERT ... ON CONFLICT DO NOTHING`` then ``SELECT ... FOR
UPDATE``, so whoever comes second waits for the first to commit and then sees its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.db import driver_fetch
from surge.kit.web.cursor import moment
from surge.kit.web.pagination import Keyset, Slice, keyset_page
from surge.models.payments import PaymentEvent, Topup

OPEN_STATUSES = ("pending", "requires_action", "processing")
TOPUPS_NEWEST_FIRST = Keyset((Topup.created_at, Topup.id), (moment, UUID), descending=True)
EVENTS_NEWEST_FIRST = Keyset(
    (PaymentEvent.received_at, PaymentEvent.id), (moment, str), descending=True
)


# ---- top-ups ------------------------------------------------------------------------------
async def lock_topup(
    session: AsyncSession,
    *,
    topup_id: UUID,
    owner_id: UUID,
    amount: int,
    currency: str,
    provider_payment_id: str,
) -> Topup:
    """The top-up row, created if missing, locked for the rest of the transaction."""
    topup: Topup | None = await session.scalar(
        insert(Topup)
        .values(
            id=topup_id,
            owner_id=owner_id,
            amount=amount,
            currency=currency,
            status="pending",
            provider_payment_id=provider_payment_id,
        )
        .on_conflict_do_nothing()
        .returning(Topup)
    )
    if topup is None:  # it existed: wait for whoever holds it, then read it
        topup = await session.scalar(
            select(Topup)
            .where(Topup.id == topup_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    if topup is None or topup.provider_payment_id != provider_payment_id:
        # The id is taken by another payment (a key reused after the provider forgot it), or
        # the payment id by another top-up: never apply one payment to another's row.
        raise LookupError(provider_payment_id)
    return topup


async def topup_by_payment(session: AsyncSession, payment_id: str) -> Topup | None:
    """The top-up of a provider payment, locked (``None`` when Surge has no row yet)."""
    return await session.scalar(
        select(Topup)
        .where(Topup.provider_payment_id == payment_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


async def topup_for_update(session: AsyncSession, topup_id: UUID) -> Topup | None:
    return await session.scalar(
        select(Topup)
        .where(Topup.id == topup_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


async def owned_topup(session: AsyncSession, owner_id: UUID, topup_id: UUID) -> Topup | None:
    return await session.scalar(
        select(Topup).where(Topup.id == topup_id, Topup.owner_id == owner_id)
    )


async def topups(
    session: AsyncSession, owner_id: UUID, *, limit: int, cursor: str | None
) -> Slice[Topup]:
    query = select(Topup).where(Topup.owner_id == owner_id)
    return await keyset_page(
        session, query, TOPUPS_NEWEST_FIRST, limit=limit, cursor=cursor, scalars=True
    )


async def stale_open_topups(
    session: AsyncSession, *, older_than: timedelta, limit: int
) -> Sequence[tuple[UUID, str]]:
    """``(id, provider payment id)`` of top-ups still open ``older_than`` after they were
    last checked, least recently checked first (partial index ``ix_payment_topups_open``)."""
    rows = await session.execute(
        select(Topup.id, Topup.provider_payment_id)
        .where(
            Topup.status.in_(OPEN_STATUSES),
            Topup.provider_payment_id.is_not(None),
            Topup.checked_at < func.now() - older_than,
        )
        .order_by(Topup.checked_at)
        .limit(limit)
    )
    return [(row[0], str(row[1])) for row in rows.all()]


async def statuses(session: AsyncSession, payment_ids: Sequence[str]) -> dict[str, str]:
    """Status of the top-ups of these provider payments (absent: Surge has no row)."""
    if not payment_ids:
        return {}
    rows = await session.execute(
        select(Topup.provider_payment_id, Topup.status).where(
            Topup.provider_payment_id.in_(list(payment_ids))
        )
    )
    return {str(row[0]): str(row[1]) for row in rows.all()}


async def totals(session: AsyncSession) -> dict[str, Any]:
    """Counts and sums by status (tests and the admin view)."""
    rows = await session.execute(
        select(
            Topup.status, func.count(), func.coalesce(func.sum(Topup.amount_credited), 0)
        ).group_by(Topup.status)
    )
    return {row[0]: {"count": int(row[1]), "credited": int(row[2])} for row in rows.all()}


# ---- the event inbox ----------------------------------------------------------------------
_INSERT_EVENT = (
    "INSERT INTO payment_events (id, type, payment_id, created, payload) "
    "VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (id) DO NOTHING RETURNING id"
)


async def insert_event(
    session: AsyncSession,
    *,
    event_id: str,
    type_: str,
    payment_id: str,
    created: int,
    payload: str,
) -> bool:
    """Store a provider event (``payload``: its JSON text, the signed body itself); False
    when its id was already received (a replay). One prepared statement on the driver
    connection, its BEGIN in the same round trip (``driver_fetch``): the webhook's hot path."""
    rows = await driver_fetch(session, _INSERT_EVENT, event_id, type_, payment_id, created, payload)
    return bool(rows)


async def pending_events(session: AsyncSession, payment_id: str) -> list[PaymentEvent]:
    """The payment's unprocessed events in the provider's order, locked."""
    return list(
        (
            await session.scalars(
                select(PaymentEvent)
                .where(PaymentEvent.payment_id == payment_id, PaymentEvent.state == "pending")
                .order_by(PaymentEvent.created, PaymentEvent.received_at, PaymentEvent.id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        ).all()
    )


async def event_for_update(session: AsyncSession, event_id: str) -> PaymentEvent | None:
    return await session.scalar(
        select(PaymentEvent).where(PaymentEvent.id == event_id).with_for_update()
    )


async def events(
    session: AsyncSession, *, state: str | None, limit: int, cursor: str | None
) -> Slice[PaymentEvent]:
    query = select(PaymentEvent)
    if state is not None:
        query = query.where(PaymentEvent.state == state)
    return await keyset_page(
        session, query, EVENTS_NEWEST_FIRST, limit=limit, cursor=cursor, scalars=True
    )


async def stale_pending_payments(session: AsyncSession, *, older_than: timedelta) -> list[str]:
    """Payments with an event still pending ``older_than`` after it arrived (a safety net:
    their processing job should have run long ago)."""
    rows = await session.execute(
        text(
            "SELECT DISTINCT payment_id FROM payment_events WHERE state = 'pending' "
            "AND received_at < now() - make_interval(secs => :s) LIMIT 500"
        ),
        {"s": older_than.total_seconds()},
    )
    return [str(row[0]) for row in rows.all()]
