"""Sending: the steps of the ``notifications.email.send`` job (ADR 0019) — decide, mark
``sending`` before the end of DATA, record the outcome (and schedule the next try)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import structlog
from jinja2 import TemplateError
from sqlalchemy.ext.asyncio import AsyncSession

from surge.config import Settings
from surge.kit.breaker import breakers
from surge.kit.jobs import enqueue
from surge.kit.runtime import Runtime
from surge.kit.security.sealing import InvalidToken
from surge.models.notifications import OutboxMessage
from surge.notifications import repository
from surge.notifications.coalesce import coalescer
from surge.notifications.keys import now
from surge.notifications.metrics import DEFERRALS, EVENTS, count
from surge.notifications.outbox import SEALED, SEND_JOB, open_secrets
from surge.notifications.render import build_message, render
from surge.notifications.smtp import RelayConfig, SmtpRelay, Verdict
from surge.notifications.suppressions import after_hard_bounce, after_soft_bounce
from surge.notifications.users import unsubscribe_token

log = structlog.get_logger()

RELAY_EXTENSION = "notifications.smtp"
BREAKER = "smtp"


def smtp_relay(runtime: Runtime) -> SmtpRelay:
    """The process's pool of connections to the configured relay (a runtime extension)."""
    relay = runtime.extensions.get(RELAY_EXTENSION)
    if relay is None:
        settings = runtime.settings
        relay = SmtpRelay(
            RelayConfig(
                host=settings.NOTIFY_SMTP_HOST,
                port=settings.NOTIFY_SMTP_PORT,
                timeout=settings.NOTIFY_SMTP_TIMEOUT.total_seconds(),
                tls=settings.NOTIFY_SMTP_TLS,
                username=settings.NOTIFY_SMTP_USERNAME,
                password=settings.NOTIFY_SMTP_PASSWORD.get_secret_value(),
                connections=settings.NOTIFY_SMTP_CONNECTIONS,
            ),
            breakers.get(BREAKER),
        )
        runtime.extensions[RELAY_EXTENSION] = relay
    assert isinstance(relay, SmtpRelay)
    return relay


@dataclass(frozen=True, slots=True)
class Prepared:
    """A message ready to go: rendered, addressed, not suppressed, not opted out."""

    id: UUID
    to: str
    content: bytes
    attempts: int
    created_at: datetime
    subject: str
    error: str | None = None
    """Set when the message cannot be built (a template error): it fails without a try."""


@dataclass(frozen=True, slots=True)
class Settle:
    """``prepare``'s decision to finish a message without sending it."""

    expected: str
    status: str
    source: str
    detail: str


class SendingUseCases:
    """The send job's steps (``surge.notifications.jobs``)."""

    async def prepare(self, runtime: Runtime, message_id_: UUID) -> Prepared | Settle | None:
        """Load a queued message and decide whether it goes: ``Prepared`` (send it),
        ``Settle`` (finish it without sending: held, skipped, unconfirmed — ``settle``
        writes that), ``None`` (already final).

        The decision is one read outside any transaction, shared with the other send jobs
        of this process (``coalesce``). Two jobs racing for one message both get past it;
        the compare-and-set in ``mark_sending`` lets one of them send."""
        return self.decide(runtime.settings, await coalescer(runtime).load(message_id_))

    async def prepare_many(
        self, runtime: Runtime, ids: list[UUID]
    ) -> dict[UUID, Prepared | Settle | None]:
        """``prepare`` for a batch of messages: their rows in one statement, then each one
        decided (rendered and built) in a turn of the event loop of its own: a batch's
        messages built in one go held the loop ~0.3 ms per message (5 ms for 16), and every
        SMTP reply and database answer of the process's other conversations waited behind
        it (ADR 0046)."""
        rows = await repository.load_many(runtime.db.primary, ids)
        decisions: dict[UUID, Prepared | Settle | None] = {}
        for id_ in ids:
            decisions[id_] = self.decide(runtime.settings, rows.get(id_))
            await asyncio.sleep(0)
        return decisions

    def decide(self, settings: Settings, row: dict[str, Any] | None) -> Prepared | Settle | None:
        """What to do with a message, from its row as ``repository.load_many`` reads it."""
        if row is None or row["status"] not in {"queued", "sending"}:
            return None
        if row["status"] == "sending":
            # An earlier attempt wrote the end of DATA (or was about to) and died before
            # hearing the reply: the relay may have the message. Never send it twice.
            return Settle("sending", "unconfirmed", "smtp", "worker stopped after the end of DATA")
        if row["suppressed_reason"] is not None:
            return Settle("queued", "held", "suppression",
                          f"{row['suppressed_reason']} ({row['suppressed_source']})")  # fmt: skip
        security = row["category"] in settings.NOTIFY_SECURITY_CATEGORIES
        if row["user_id"] is not None and not security and row["preference"] is False:
            return Settle("queued", "skipped", "preferences", f"opted out of {row['category']}")
        return self._build(settings, row)

    async def settle(self, session: AsyncSession, message_id_: UUID, decision: Settle) -> None:
        """Finish a message ``prepare`` decided not to send (in the job's transaction)."""
        await self._finish_from(session, message_id_, decision.expected, decision.status,
                                source=decision.source, detail=decision.detail)  # fmt: skip

    async def _finish_from(
        self,
        session: AsyncSession,
        message_id_: UUID,
        expected: str,
        status: str,
        *,
        source: str,
        detail: str,
    ) -> None:
        locked = await repository.get_message(session, message_id_, for_update=True)
        if locked is not None and locked.status == expected:
            await self._finish(session, locked, status, source=source, detail=detail)

    def _build(self, settings: Settings, row: dict[str, Any]) -> Prepared:
        unsubscribe_url = None
        if (
            row["user_id"] is not None
            and row["category"] not in settings.NOTIFY_SECURITY_CATEGORIES
        ):
            token = unsubscribe_token(settings, row["user_id"], row["category"])
            unsubscribe_url = (
                f"{settings.NOTIFY_PUBLIC_URL.rstrip('/')}/api/v1/notifications/unsubscribe"
                f"?token={token}"
            )
        context = {
            **json.loads(row["context"]),
            "public_url": settings.NOTIFY_PUBLIC_URL,
            "unsubscribe_url": unsubscribe_url,
        }
        try:
            context.update(open_secrets(settings, context.pop(SEALED, None)))
            rendered = render(row["template"], row["locale"], context)
        except InvalidToken:
            return Prepared(row["id"], row["to_address"], b"", row["attempts"], row["created_at"],
                            subject="", error="sealed context does not open (SECRET_KEY changed?)")  # fmt: skip
        except TemplateError as error:
            return Prepared(row["id"], row["to_address"], b"", row["attempts"], row["created_at"],
                            subject="", error=f"template: {error}")  # fmt: skip
        content = build_message(
            outbox_id=row["id"],
            sender=settings.NOTIFY_FROM,
            to=row["to_address"],
            rendered=rendered,
            created_at=row["created_at"],
            unsubscribe_url=unsubscribe_url,
            category=row["category"],
        )
        return Prepared(
            row["id"], row["to_address"], content, row["attempts"], row["created_at"],
            subject=rendered.subject,
        )  # fmt: skip

    async def mark_sending(self, runtime: Runtime, message_id_: UUID) -> bool:
        """Record, *before* the end of DATA goes on the wire, that it is about to: the
        crash-window guard (ADR 0019). Committed when this returns — in a statement of its
        own, shared with the marks of the other messages of this process that reached the
        same point (ADR 0026). False when another attempt already did."""
        return await coalescer(runtime).mark(message_id_)

    async def transmit(
        self,
        runtime: Runtime,
        prepared: Prepared,
        *,
        mark: Callable[[], Awaitable[bool]] | None = None,
        connected: Callable[[], None] | None = None,
    ) -> Verdict:
        """Hand ``prepared`` to the relay (through the ``smtp`` breaker), marking it
        ``sending`` just before the end of DATA (``mark``: how; by default alone through the
        process's mark lane)."""
        if prepared.error is not None:
            return Verdict("failed", None, prepared.error, "render")

        async def before_end() -> bool:
            return await self.mark_sending(runtime, prepared.id)

        return await smtp_relay(runtime).send(
            sender=runtime.settings.NOTIFY_RETURN_PATH,
            recipient=prepared.to,
            content=prepared.content,
            before_end=mark or before_end,
            connected=connected,
        )

    async def record_sent(
        self, runtime: Runtime, message_id_: UUID, verdict: Verdict, *, subject: str | None
    ) -> bool:
        """The common outcome, outside the job's transaction: ``sent`` and its final event,
        committed (durably) in a statement shared with the other messages of this process
        that finished at the same time. False when the row was no longer queued/sending
        (another attempt finished it): nothing written. A worker killed before this commit
        leaves the row ``sending``: the next attempt records ``unconfirmed``, never a copy."""
        recorded = await coalescer(runtime).sent(
            (message_id_, verdict.code, verdict.detail[:1000], subject)
        )
        if recorded:
            EVENTS.labels("sent").inc()
        return recorded

    async def record(
        self,
        session: AsyncSession,
        runtime: Runtime,
        message_id_: UUID,
        verdict: Verdict,
        *,
        retry_key: str,
        subject: str | None = None,
    ) -> str:
        """Write the outcome of one attempt; schedule the next one after a transient
        failure. Returns the message's status afterwards."""
        settings = runtime.settings
        if verdict.kind == "aborted":
            return "sending"
        if verdict.kind == "sent" and await repository.record_sent(
            session, message_id_, code=verdict.code, detail=verdict.detail, subject=subject
        ):
            count(session, "sent")
            return "sent"
        row = await repository.get_message(session, message_id_, for_update=True)
        if row is None:
            return row.status if row is not None else "missing"
        if row.status not in {"queued", "sending"}:
            return row.status  # finished meanwhile (e.g. a duplicate job): keep it
        row.last_code = verdict.code
        # A success is not an error: the relay's reply to it stays in the 'sent' event.
        row.last_error = None if verdict.kind == "sent" else verdict.detail or None
        if subject:
            row.subject = subject
        if verdict.stage != "breaker":  # refused by the open breaker: not tried
            row.attempts += 1
        if verdict.kind == "sent":
            row.sent_at = now()
            await self._finish(session, row, "sent", source="smtp", code=verdict.code,
                               detail=verdict.detail)  # fmt: skip
        elif verdict.kind == "unconfirmed":
            await self._finish(session, row, "unconfirmed", source="smtp",
                               detail=verdict.detail)  # fmt: skip
        elif verdict.kind == "hard":
            await self._finish(session, row, "bounced", source="smtp", code=verdict.code,
                               detail=verdict.detail)  # fmt: skip
            await after_hard_bounce(session, settings, row.to_address, "smtp", verdict.detail)
        elif verdict.kind == "failed":
            await self._finish(session, row, "failed", source=verdict.stage, detail=verdict.detail)
        elif verdict.kind == "blocked":
            await self._finish(session, row, "blocked", source="smtp", code=verdict.code,
                               detail=verdict.detail)  # fmt: skip
        else:
            await self._defer(session, runtime, row, verdict, retry_key=retry_key)
        return row.status

    async def _defer(
        self,
        session: AsyncSession,
        runtime: Runtime,
        row: OutboxMessage,
        verdict: Verdict,
        *,
        retry_key: str,
    ) -> None:
        settings = runtime.settings
        row.status = "queued"
        DEFERRALS.labels(verdict.stage or "unknown").inc()
        if verdict.stage == "breaker":  # not tried: not an attempt, no soft bounce
            delay = timedelta(seconds=max(1.0, verdict.retry_after or 1.0))
        else:
            schedule = settings.NOTIFY_RETRY_SCHEDULE or [timedelta(minutes=30)]
            delay = schedule[min(row.attempts, len(schedule)) - 1]
            if verdict.address_fault:
                await repository.add_event(session, address=row.to_address, event="deferred",
                                           source="smtp", message_id=row.id, code=verdict.code,
                                           detail=verdict.detail)  # fmt: skip
                if await after_soft_bounce(session, settings, row.to_address):
                    await self._finish(session, row, "held", source="suppression",
                                       detail="soft_bounces (smtp)")  # fmt: skip
                    return
        if now() + delay - row.created_at > settings.NOTIFY_MAX_AGE:
            await self._finish(session, row, "failed", source="smtp", code=verdict.code,
                               detail=f"gave up after {row.attempts} attempts: {verdict.detail}")  # fmt: skip
            return
        row.next_attempt_at = now() + delay
        await enqueue(session, SEND_JOB, {"message_id": str(row.id)}, delay=delay,
                      dedup_key=retry_key)  # fmt: skip

    async def _finish(
        self,
        session: AsyncSession,
        row: OutboxMessage,
        status: str,
        *,
        source: str,
        code: int | None = None,
        detail: str | None = None,
    ) -> None:
        """The one final event of a message (not one per try)."""
        row.status = status
        row.finished_at = now()
        if detail is not None and status != "sent":
            row.last_error = detail[:1000]
        await repository.add_event(session, address=row.to_address, event=status, source=source,
                                   message_id=row.id, code=code, detail=detail)  # fmt: skip
        await session.flush()
        count(session, status)
        log.info("notifications.email.final", message_id=str(row.id), status=status,
                 source=source, code=code)  # fmt: skip
