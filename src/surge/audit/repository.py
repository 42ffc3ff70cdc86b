"""The audit log's queries."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.web.cursor import bigint
from surge.kit.web.pagination import Keyset, Slice, keyset_page
from surge.models.audit import AuditEntry

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
