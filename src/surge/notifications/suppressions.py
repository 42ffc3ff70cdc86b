"""Suppressions: added after hard bounces, repeated soft bounces, complaints or by an
admin; lifting one re-queues the mail it held (ADR 0019)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID, uuid4

from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.service import audit as audit_service
from surge.config import Settings
from surge.kit.jobs import enqueue
from surge.kit.web.pagination import Slice
from surge.models.notifications import Suppression
from surge.notifications import repository
from surge.notifications.errors import SuppressionNotFound
from surge.notifications.keys import now
from surge.notifications.outbox import SEND_JOB


async def after_hard_bounce(
    session: AsyncSession, settings: Settings, address: str, source: str, detail: str
) -> None:
    if (
        await repository.count_events(session, address, "bounced")
        >= settings.NOTIFY_HARD_BOUNCE_LIMIT
    ):
        await repository.suppress(session, address, reason="hard_bounce", source=source,
                                  detail=detail[:500], expires_at=None)  # fmt: skip


async def after_soft_bounce(session: AsyncSession, settings: Settings, address: str) -> bool:
    since = now() - settings.NOTIFY_SOFT_BOUNCE_WINDOW
    count = await repository.count_events(session, address, "deferred", since=since)
    if count < settings.NOTIFY_SOFT_BOUNCE_LIMIT:
        return False
    await repository.suppress(
        session, address, reason="soft_bounces", source="smtp",
        detail=f"{count} soft bounces since {since:%Y-%m-%d}",
        expires_at=now() + settings.NOTIFY_SOFT_SUPPRESSION_TTL,
    )  # fmt: skip
    return True


class SuppressionUseCases:
    """The admin's side of the suppression list."""

    async def suppress(
        self,
        session: AsyncSession,
        actor_id: UUID | None,
        address: str,
        *,
        detail: str | None = None,
        expires_at: datetime | None = None,
        request_id: str | None = None,
    ) -> Suppression:
        """An admin suppresses an address by hand (``reason="manual"``); audited."""
        address = address.strip().lower()
        await repository.suppress(session, address, reason="manual", source="admin",
                                  detail=detail, expires_at=expires_at)  # fmt: skip
        await audit_service.record(
            session, actor_id, action="notifications.suppression.add",
            subject_type="email_address", subject_id=address,
            after={"reason": "manual", "detail": detail}, request_id=request_id,
        )  # fmt: skip
        row = await repository.suppression(session, address)
        assert row is not None  # written just above, in this transaction
        return row

    async def list_suppressions(
        self, session: AsyncSession, *, limit: int, cursor: str | None
    ) -> Slice[Suppression]:
        """Suppressions by address, a page at a time."""
        return await repository.list_suppressions(session, limit=limit, cursor=cursor)

    async def lift(
        self,
        session: AsyncSession,
        actor_id: UUID | None,
        address: str,
        *,
        request_id: str | None = None,
    ) -> tuple[Suppression, list[UUID]]:
        """Lift a suppression and re-queue every message held for the address (in this
        transaction; audited). Returns the suppression lifted and the messages re-queued."""
        address = address.strip().lower()
        row = await repository.lift_suppression(session, address)
        if row is None:
            raise SuppressionNotFound(f"{address} is not suppressed")
        requeued = await repository.requeue_held(session, address)
        for id_ in requeued:
            await repository.add_event(session, address=address, event="requeued",
                                       source="admin", message_id=id_)  # fmt: skip
            await enqueue(session, SEND_JOB, {"message_id": str(id_)},
                          dedup_key=f"notify:{id_}:lift:{uuid4().hex[:8]}")  # fmt: skip
        await audit_service.record(
            session, actor_id, action="notifications.suppression.lift",
            subject_type="email_address", subject_id=address,
            before={"reason": row.reason, "source": row.source},
            after={"requeued": len(requeued)}, request_id=request_id,
        )  # fmt: skip
        return row, requeued
