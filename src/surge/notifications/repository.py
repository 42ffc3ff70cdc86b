"""Every query of the notifications domain (the service calls these; nothing else does)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from surge.kit.db import autocommit_fetch
from surge.kit.web.cursor import moment
from surge.kit.web.pagination import Keyset, Slice, keyset_page
from surge.models.notifications import NotificationEvent, OutboxMessage, Preference, Suppression

#: The console's listings: newest message first; suppressions by address (unique).
MESSAGES_NEWEST_FIRST = Keyset(
    (OutboxMessage.created_at, OutboxMessage.id), (moment, UUID), descending=True
)
SUPPRESSIONS_BY_ADDRESS = Keyset((Suppression.address,), (str,))


async def insert_message(session: AsyncSession, values: dict[str, Any]) -> UUID | None:
    """Insert an outbox row; ``None`` when a row with the same ``key`` exists already."""
    statement = (
        insert(OutboxMessage)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(OutboxMessage.id)
    )
    return (await session.execute(statement)).scalar_one_or_none()


async def message_id_by_key(session: AsyncSession, key: str) -> UUID | None:
    return await session.scalar(select(OutboxMessage.id).where(OutboxMessage.key == key))


async def get_message(
    session: AsyncSession,
    message_id: UUID,
    *,
    for_update: bool = False,
    populate_existing: bool = False,
) -> OutboxMessage | None:
    statement = select(OutboxMessage).where(OutboxMessage.id == message_id)
    if for_update:
        statement = statement.with_for_update().execution_options(populate_existing=True)
    elif populate_existing:
        statement = statement.execution_options(populate_existing=True)
    return await session.scalar(statement)


# ---- the send path (surge.notifications.coalesce): each statement serves every message queued
# for it, in autocommit, on the driver's prepared statements -----------------------------------
_LOAD_FOR_SENDING = """
    SELECT m.id, m.status, m.to_address, m.template, m.locale, m.category,
           m.context::text AS context, m.user_id, m.attempts, m.created_at,
           s.reason AS suppressed_reason, s.source AS suppressed_source,
           p.enabled AS preference
    FROM notification_messages m
    LEFT JOIN notification_suppressions s
           ON s.address = m.to_address AND (s.expires_at IS NULL OR s.expires_at > now())
    LEFT JOIN notification_preferences p ON p.user_id = m.user_id AND p.category = m.category
    WHERE m.id = $1
"""
_LOAD_MANY = _LOAD_FOR_SENDING.replace("WHERE m.id = $1", "WHERE m.id = ANY($1::uuid[])")
_MARK_MANY = (
    "UPDATE notification_messages SET status = 'sending' "
    "WHERE id = ANY($1::uuid[]) AND status = 'queued' RETURNING id"
)
# The same, committed without waiting for the WAL flush: set_config(..., true) is local to
# the statement's own (implicit) transaction, whose commit reads synchronous_commit.
_MARK_MANY_ASYNC = (
    "WITH c AS (SELECT set_config('synchronous_commit', 'off', true)) "
    "UPDATE notification_messages SET status = 'sending' "
    "WHERE id = ANY($1::uuid[]) AND status = 'queued' AND EXISTS (SELECT FROM c) RETURNING id"
)
_SENT_MANY = """
    WITH v AS (
        SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[])
               AS v(id, code, detail, subject)
    ), m AS (
        UPDATE notification_messages n
        SET status = 'sent', sent_at = now(), finished_at = now(), last_code = v.code,
            last_error = NULL, subject = COALESCE(v.subject, n.subject),
            attempts = n.attempts + 1
        FROM v
        WHERE n.id = v.id AND n.status IN ('queued', 'sending')
        RETURNING n.id, n.to_address, v.code, v.detail
    )
    INSERT INTO notification_events (message_id, address, event, source, code, detail)
    SELECT id, to_address, 'sent', 'smtp', code, detail FROM m
    RETURNING message_id
"""


async def load_many(engine: AsyncEngine, ids: Sequence[UUID]) -> dict[UUID, dict[str, Any]]:
    """The messages with their address's active suppression and their user's preference for
    their category, in one statement outside any transaction (a read: nothing to commit)."""
    rows = await autocommit_fetch(engine, _LOAD_MANY, list(ids))
    return {row["id"]: dict(row) for row in rows}


async def mark_sending_many(engine: AsyncEngine, ids: Sequence[UUID], *, flush: bool) -> set[UUID]:
    """``queued`` → ``sending`` (compare-and-set) for many messages: one statement, one
    commit (``flush=False``: not waiting for the WAL flush, NOTIFY_SENDING_MARK_FLUSH); the ids
    that were still ``queued`` (the others belong to another attempt)."""
    rows = await autocommit_fetch(engine, _MARK_MANY if flush else _MARK_MANY_ASYNC, list(ids))
    return {row["id"] for row in rows}


async def record_sent_many(
    engine: AsyncEngine, outcomes: Sequence[tuple[UUID, int | None, str, str | None]]
) -> set[UUID]:
    """``record_sent`` for many messages in one durable commit: each ``(id, code, detail,
    subject)`` becomes ``sent`` with its final event; returns the ids recorded (a message
    no longer queued/sending was finished by another attempt and is left alone)."""
    ids, codes, details, subjects = (list(column) for column in zip(*outcomes, strict=True))
    rows = await autocommit_fetch(
        engine, _SENT_MANY, ids, codes, [d[:1000] for d in details], subjects
    )
    return {row["message_id"] for row in rows}


async def record_sent(
    session: AsyncSession, message_id: UUID, *, code: int | None, detail: str, subject: str | None
) -> bool:
    """The common outcome in one statement: the message is ``sent`` and its final event
    written (False when the message was no longer queued/sending)."""
    result = await session.execute(
        text(
            """
            WITH m AS (
                UPDATE notification_messages
                SET status = 'sent', sent_at = now(), finished_at = now(),
                    last_code = :code, last_error = NULL,
                    subject = COALESCE(:subject, subject), attempts = attempts + 1
                WHERE id = :id AND status IN ('queued', 'sending')
                RETURNING id, to_address
            )
            INSERT INTO notification_events (message_id, address, event, source, code, detail)
            SELECT id, to_address, 'sent', 'smtp', :code, :detail FROM m
            RETURNING id
            """
        ),
        {"id": message_id, "code": code, "detail": detail[:1000], "subject": subject},
    )
    return result.scalar_one_or_none() is not None


async def active_suppression(
    session: AsyncSession, address: str, *, now: datetime
) -> Suppression | None:
    return await session.scalar(
        select(Suppression).where(
            Suppression.address == address,
            (Suppression.expires_at.is_(None)) | (Suppression.expires_at > now),
        )
    )


async def suppress(
    session: AsyncSession,
    address: str,
    *,
    reason: str,
    source: str,
    detail: str | None,
    expires_at: datetime | None,
) -> None:
    """Add (or renew) a suppression; an existing one keeps the stronger (longer) term."""
    statement = insert(Suppression).values(
        address=address, reason=reason, source=source, detail=detail, expires_at=expires_at
    )
    statement = statement.on_conflict_do_update(
        index_elements=["address"],
        set_={
            "reason": statement.excluded.reason,
            "source": statement.excluded.source,
            "detail": statement.excluded.detail,
            "created_at": func.now(),
            "expires_at": text(
                "CASE WHEN notification_suppressions.expires_at IS NULL "
                "OR EXCLUDED.expires_at IS NULL THEN NULL "
                "ELSE greatest(notification_suppressions.expires_at, EXCLUDED.expires_at) END"
            ),
        },
    )
    await session.execute(statement)


async def lift_suppression(session: AsyncSession, address: str) -> Suppression | None:
    row = await session.scalar(
        delete(Suppression).where(Suppression.address == address).returning(Suppression)
    )
    return row


async def suppression(session: AsyncSession, address: str) -> Suppression | None:
    statement = select(Suppression).where(Suppression.address == address.strip().lower())
    return (await session.scalars(statement)).first()


async def list_suppressions(
    session: AsyncSession, *, limit: int, cursor: str | None
) -> Slice[Suppression]:
    return await keyset_page(
        session, select(Suppression), SUPPRESSIONS_BY_ADDRESS, limit=limit, cursor=cursor,
        scalars=True,
    )  # fmt: skip


async def requeue_held(session: AsyncSession, address: str) -> list[UUID]:
    result = await session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.to_address == address, OutboxMessage.status == "held")
        .values(status="queued", finished_at=None, next_attempt_at=func.now())
        .returning(OutboxMessage.id)
    )
    return list(result.scalars())


async def add_event(
    session: AsyncSession,
    *,
    address: str,
    event: str,
    source: str,
    message_id: UUID | None = None,
    code: int | None = None,
    detail: str | None = None,
) -> None:
    session.add(
        NotificationEvent(
            message_id=message_id,
            address=address,
            event=event,
            source=source,
            code=code,
            detail=detail[:1000] if detail else detail,
        )
    )


async def count_events(
    session: AsyncSession, address: str, event: str, *, since: datetime | None = None
) -> int:
    statement = select(func.count()).where(
        NotificationEvent.address == address, NotificationEvent.event == event
    )
    if since is not None:
        statement = statement.where(NotificationEvent.created_at >= since)
    return int(await session.scalar(statement) or 0)


async def claim_external_event(
    session: AsyncSession, *, source: str, external_id: str, address: str, event: str
) -> bool:
    """Record a provider's event id; False when it was recorded before (a redelivery)."""
    statement = (
        insert(NotificationEvent)
        .values(source=source, external_id=external_id, address=address, event=f"{event}.received")
        .on_conflict_do_nothing(
            index_elements=["source", "external_id"],
            index_where=text("external_id IS NOT NULL"),
        )
        .returning(NotificationEvent.id)
    )
    return (await session.execute(statement)).scalar_one_or_none() is not None


async def preference(session: AsyncSession, user_id: UUID, category: str) -> bool | None:
    return await session.scalar(
        select(Preference.enabled).where(
            Preference.user_id == user_id, Preference.category == category
        )
    )


async def preferences(session: AsyncSession, user_id: UUID) -> dict[str, bool]:
    rows = await session.execute(
        select(Preference.category, Preference.enabled).where(Preference.user_id == user_id)
    )
    return {str(category): bool(enabled) for category, enabled in rows.all()}


async def set_preference(
    session: AsyncSession, user_id: UUID, category: str, enabled: bool
) -> None:
    statement = insert(Preference).values(user_id=user_id, category=category, enabled=enabled)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["user_id", "category"],
            set_={"enabled": enabled, "updated_at": func.now()},
        )
    )


async def recent_messages(
    session: AsyncSession, *, limit: int, cursor: str | None, status: str | None
) -> Slice[OutboxMessage]:
    statement = select(OutboxMessage)
    if status is not None:
        statement = statement.where(OutboxMessage.status == status)
    return await keyset_page(
        session, statement, MESSAGES_NEWEST_FIRST, limit=limit, cursor=cursor, scalars=True
    )


async def event_totals(session: AsyncSession, *, since: datetime) -> dict[str, int]:
    rows = await session.execute(
        select(NotificationEvent.event, func.count())
        .where(NotificationEvent.created_at >= since)
        .group_by(NotificationEvent.event)
    )
    return {event: int(count) for event, count in rows.all()}


async def overdue(session: AsyncSession, *, before: datetime, limit: int) -> list[UUID]:
    """Queued messages whose attempt is long overdue (their job was lost or failed)."""
    result = await session.execute(
        select(OutboxMessage.id)
        .where(
            OutboxMessage.status == "queued",
            func.coalesce(OutboxMessage.next_attempt_at, OutboxMessage.created_at) < before,
        )
        .order_by(OutboxMessage.created_at)
        .limit(limit)
    )
    return list(result.scalars())
