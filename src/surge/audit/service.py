"""The audit log (seed 004): append-only, written in the acting request's unit of work, so
an action and its audit row commit or vanish together.

    from surge.audit.service import audit as audit_service

    await audit_service.record(session, admin.user_id, action="wallet.withdrawal.approve",
                               subject_type="withdrawal", subject_id=str(w.id),
                               after={"status": "approved", "amount": w.amount},
                               request_id=request_id)

No errors of its own: a bad cursor is ``kit.web.cursor.InvalidCursor`` (400).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit import repository
from surge.kit.web.pagination import Slice
from surge.models.audit import AuditEntry


class AuditService:
    """Stateless; see the module docstring."""

    async def record(
        self,
        session: AsyncSession,
        actor_id: uuid.UUID | None,
        *,
        action: str,
        subject_type: str,
        subject_id: str,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        """Append one row in the caller's transaction (flushed, not committed)."""
        await repository.add(
            session,
            actor_id,
            action=action,
            subject_type=subject_type,
            subject_id=subject_id,
            before=before,
            after=after,
            request_id=request_id,
        )

    async def page(
        self,
        session: AsyncSession,
        *,
        subject_type: str | None = None,
        subject_id: str | None = None,
        limit: int,
        cursor: str | None = None,
    ) -> Slice[AuditEntry]:
        """Newest first, optionally one subject's history."""
        return await repository.page(
            session, subject_type=subject_type, subject_id=subject_id, limit=limit, cursor=cursor
        )


audit = AuditService()
