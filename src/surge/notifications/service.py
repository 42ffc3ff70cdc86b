"""Notifications: a transactional e-mail outbox sent over real SMTP, with bounces,
complaints, suppressions and per-user preferences (ADR 0019).

Other domains call one method, in the transaction of the change that causes the mail::

    from surge.notifications.service import notifications as notifications_service

    await notifications_service.send(
        session,                          # the business transaction: rollback = no mail
        to=partner.email,                 # the address (identity_service.get_user(...).email)
        user_id=owner_id,                 # optional: preferences and the unsubscribe link
        template="withdrawal_decided",    # templates/<locale>/withdrawal_decided.{subject.txt,txt,html}
        context={"amount": 1250, "currency": "USD", "status": "approved", ...},
        category="wallet",                # users can opt out of a category, never of "security"
        key=f"withdrawal-decided:{withdrawal_id}",   # one mail per key, ever
    )

Templates in use: ``welcome`` (identity, category ``account``), ``new_device`` and
``password_reset`` (``security``), ``withdrawal_decided`` (``wallet``),
``operation_finished`` (``operations``), ``topup_credited`` (``payments``).

    NotificationError (SurgeError)
    ├── UnknownTemplate (UnprocessableEntity)     422: no such template in any locale
    ├── NoAddress (UnprocessableEntity)           422: ``to`` is not an address
    ├── SuppressionNotFound (NotFound)            404: lifting an address that is not suppressed
    ├── InvalidUnsubscribeToken (BadRequest)      400: forged, truncated or for another user
    └── InvalidWebhookSignature (NotAuthenticated) 401: missing, forged or stale signature
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pydantic_core
import structlog
from jinja2 import TemplateError, TemplateNotFound
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.service import audit as audit_service
from surge.config import Settings
from surge.kit.breaker import breakers
from surge.kit.db import on_commit
from surge.kit.errors import BadRequest, NotAuthenticated, NotFound, SurgeError, UnprocessableEntity
from surge.kit.jobs import enqueue
from surge.kit.runtime import Runtime
from surge.models.notifications import OutboxMessage, Suppression
from surge.notifications import repository
from surge.notifications.dsn import parse_dsn
from surge.notifications.render import build_message, message_id, render, template_locale
from surge.notifications.smtp import RelayConfig, SmtpRelay, Verdict, classify, enhanced_status

log = structlog.get_logger()

SEND_JOB = "notifications.email.send"
RELAY_EXTENSION = "notifications.smtp"
BREAKER = "smtp"

EVENTS = Counter(
    "surge_notify_events_total",
    "Final outcomes of e-mails (sent, bounced, blocked, failed, unconfirmed, held, skipped) "
    "and feedback (complained, delivered, unsubscribed); one per message, not per try.",
    ["event"],
)
DEFERRALS = Counter("surge_notify_deferrals_total", "Transient failures (one per try).", ["stage"])
#: The last 24 h (NOTIFY_RATE_WINDOW), refreshed by the ``notifications.rates.check`` job:
#: what SES reviews an account on (alerts in deploy/prometheus/alerts.yml).
BOUNCE_RATE = Gauge("surge_notify_bounce_rate", "Hard bounces / sent over the rate window.",
                    multiprocess_mode="max")  # fmt: skip
COMPLAINT_RATE = Gauge("surge_notify_complaint_rate", "Complaints / sent over the rate window.",
                       multiprocess_mode="max")  # fmt: skip
WINDOW_SENT = Gauge("surge_notify_window_sent", "E-mails sent over the rate window.",
                    multiprocess_mode="max")  # fmt: skip


class NotificationError(SurgeError):
    """Base of the notifications domain's errors."""


class UnknownTemplate(NotificationError, UnprocessableEntity):
    """No template of that name in any locale."""


class NoAddress(NotificationError, UnprocessableEntity):
    """The recipient is not an e-mail address."""


class SuppressionNotFound(NotificationError, NotFound):
    """The address is not on the suppression list."""


class InvalidUnsubscribeToken(NotificationError, BadRequest):
    """The unsubscribe token is forged or malformed."""


class InvalidWebhookSignature(NotificationError, NotAuthenticated):
    """The webhook's signature is missing, wrong or outside the tolerance."""


def _now() -> datetime:
    return datetime.now(UTC)


def _derive(settings: Settings, purpose: str) -> bytes:
    root = settings.SECRET_KEY.get_secret_value().encode()
    return hmac.new(root, purpose.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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
class ProviderEvent:
    """One event of the signed webhook (``POST /api/v1/webhooks/email``, ADR 0019)."""

    id: str
    type: str
    recipient: str
    message_id: UUID | None = None
    bounce_type: str | None = None
    code: int | None = None
    diagnostic: str | None = None


@dataclass(frozen=True, slots=True)
class Rates:
    since: datetime
    sent: int
    bounced: int
    complained: int

    @property
    def bounce_rate(self) -> float:
        return self.bounced / self.sent if self.sent else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complained / self.sent if self.sent else 0.0


class NotificationService:
    """The notifications domain's use cases (stateless; settings come from the runtime)."""

    # ---- producing (any domain, in its own transaction) ---------------------------------
    async def send(
        self,
        session: AsyncSession,
        *,
        template: str,
        context: dict[str, Any],
        category: str,
        key: str,
        to: str,
        user_id: UUID | None = None,
        locale: str = "en",
    ) -> UUID:
        """Write one e-mail to the outbox in ``session``'s transaction and enqueue its
        sending there too: it leaves only if the caller's transaction commits, and exactly
        once per ``key`` (a second call with the same key returns the first message's id).
        Preferences and suppressions are checked when it is sent, not now."""
        try:
            template_locale(template, locale)
        except TemplateNotFound as error:
            raise UnknownTemplate(f"no e-mail template {template!r}") from error
        if not to or "@" not in to:
            raise NoAddress("the e-mail has no recipient address")
        message_id_ = uuid4()
        inserted = await repository.insert_message(
            session,
            {
                "id": message_id_,
                "key": key,
                "user_id": user_id,
                "to_address": to.strip().lower(),
                "template": template,
                "locale": locale,
                "category": category,
                "context": pydantic_core.to_jsonable_python(context),
            },
        )
        if inserted is None:
            existing = await repository.message_id_by_key(session, key)
            assert existing is not None
            return existing
        await enqueue(
            session, SEND_JOB, {"message_id": str(inserted)}, dedup_key=f"notify:{inserted}"
        )
        return inserted

    # ---- sending (the job, one step per transaction; see jobs.py) -----------------------
    async def prepare(
        self, session: AsyncSession, runtime: Runtime, message_id_: UUID
    ) -> Prepared | None:
        """Load a queued message and decide whether it goes: ``None`` when it is already
        final, or has just been finalized in ``session`` (held, skipped, unconfirmed).

        The decision is one read outside any transaction (this runs once per e-mail; a
        lock would be a write and a flushed commit). Two jobs racing for one message both
        get past it; the compare-and-set in ``mark_sending`` lets one of them send."""
        settings = runtime.settings
        row = await repository.load_for_sending(runtime.db.primary, message_id_)
        if row is None or row["status"] not in {"queued", "sending"}:
            return None
        if row["status"] == "sending":
            # An earlier attempt wrote the end of DATA (or was about to) and died before
            # hearing the reply: the relay may have the message. Never send it twice.
            await self._finish_from(session, message_id_, "sending", "unconfirmed", source="smtp",
                                    detail="worker stopped after the end of DATA")  # fmt: skip
            return None
        if row["suppressed_reason"] is not None:
            await self._finish_from(session, message_id_, "queued", "held", source="suppression",
                                    detail=f"{row['suppressed_reason']} ({row['suppressed_source']})")  # fmt: skip
            return None
        security = row["category"] in settings.NOTIFY_SECURITY_CATEGORIES
        if row["user_id"] is not None and not security and row["preference"] is False:
            await self._finish_from(session, message_id_, "queued", "skipped", source="preferences",
                                    detail=f"opted out of {row['category']}")  # fmt: skip
            return None
        return self._build(settings, row)

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
            token = self.unsubscribe_token(settings, row["user_id"], row["category"])
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
            rendered = render(row["template"], row["locale"], context)
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
        crash-window guard (ADR 0019). Committed when this returns — the one write of this
        domain that is a transaction of its own, on purpose. False when another attempt
        already did."""
        return await repository.mark_sending_now(
            runtime.db.primary, message_id_, flush=runtime.settings.NOTIFY_SENDING_MARK_FLUSH
        )

    async def transmit(self, runtime: Runtime, prepared: Prepared) -> Verdict:
        """Hand ``prepared`` to the relay (through the ``smtp`` breaker), marking it
        ``sending`` just before the end of DATA."""
        if prepared.error is not None:
            return Verdict("failed", None, prepared.error, "render")

        async def before_end() -> bool:
            return await self.mark_sending(runtime, prepared.id)

        return await smtp_relay(runtime).send(
            sender=runtime.settings.NOTIFY_RETURN_PATH,
            recipient=prepared.to,
            content=prepared.content,
            before_end=before_end,
        )

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
            self._count(session, "sent")
            return "sent"
        row = await repository.get_message(session, message_id_, for_update=True)
        if row is None:
            return row.status if row is not None else "missing"
        if row.status not in {"queued", "sending"}:
            return row.status  # finished meanwhile (e.g. a duplicate job): keep it
        row.last_code = verdict.code
        row.last_error = verdict.detail or None
        if subject:
            row.subject = subject
        if verdict.stage != "breaker":  # refused by the open breaker: not tried
            row.attempts += 1
        if verdict.kind == "sent":
            row.sent_at = _now()
            await self._finish(session, row, "sent", source="smtp", code=verdict.code,
                               detail=verdict.detail)  # fmt: skip
        elif verdict.kind == "unconfirmed":
            await self._finish(session, row, "unconfirmed", source="smtp",
                               detail=verdict.detail)  # fmt: skip
        elif verdict.kind == "hard":
            await self._finish(session, row, "bounced", source="smtp", code=verdict.code,
                               detail=verdict.detail)  # fmt: skip
            await self._after_hard_bounce(session, settings, row.to_address, "smtp", verdict.detail)
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
                if await self._after_soft_bounce(session, settings, row.to_address):
                    await self._finish(session, row, "held", source="suppression",
                                       detail="soft_bounces (smtp)")  # fmt: skip
                    return
        if _now() + delay - row.created_at > settings.NOTIFY_MAX_AGE:
            await self._finish(session, row, "failed", source="smtp", code=verdict.code,
                               detail=f"gave up after {row.attempts} attempts: {verdict.detail}")  # fmt: skip
            return
        row.next_attempt_at = _now() + delay
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
        row.finished_at = _now()
        if detail is not None:
            row.last_error = detail[:1000]
        await repository.add_event(session, address=row.to_address, event=status, source=source,
                                   message_id=row.id, code=code, detail=detail)  # fmt: skip
        await session.flush()
        self._count(session, status)
        log.info("notifications.email.final", message_id=str(row.id), status=status,
                 source=source, code=code)  # fmt: skip

    def _count(self, session: AsyncSession, event: str) -> None:
        counter = EVENTS.labels(event)

        async def bump() -> None:
            counter.inc()

        on_commit(session, bump)

    async def sweep(self, session: AsyncSession, *, grace: timedelta, limit: int = 500) -> int:
        """Re-enqueue queued messages overdue by ``grace`` (a job lost to a failure the job
        engine gave up on). A duplicate job is harmless: ``mark_sending`` lets one send."""
        ids = await repository.overdue(session, before=_now() - grace, limit=limit)
        for id_ in ids:
            await enqueue(session, SEND_JOB, {"message_id": str(id_)},
                          dedup_key=f"notify:{id_}:sweep")  # fmt: skip
        return len(ids)

    # ---- suppressions -------------------------------------------------------------------
    async def _after_hard_bounce(
        self, session: AsyncSession, settings: Settings, address: str, source: str, detail: str
    ) -> None:
        if (
            await repository.count_events(session, address, "bounced")
            >= settings.NOTIFY_HARD_BOUNCE_LIMIT
        ):
            await repository.suppress(session, address, reason="hard_bounce", source=source,
                                      detail=detail[:500], expires_at=None)  # fmt: skip

    async def _after_soft_bounce(
        self, session: AsyncSession, settings: Settings, address: str
    ) -> bool:
        since = _now() - settings.NOTIFY_SOFT_BOUNCE_WINDOW
        count = await repository.count_events(session, address, "deferred", since=since)
        if count < settings.NOTIFY_SOFT_BOUNCE_LIMIT:
            return False
        await repository.suppress(
            session, address, reason="soft_bounces", source="smtp",
            detail=f"{count} soft bounces since {since:%Y-%m-%d}",
            expires_at=_now() + settings.NOTIFY_SOFT_SUPPRESSION_TTL,
        )  # fmt: skip
        return True

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
        [row] = await repository.list_suppressions(session, after=None, limit=1, address=address)
        return row

    async def list_suppressions(
        self, session: AsyncSession, *, after: str | None, limit: int, address: str | None = None
    ) -> list[Suppression]:
        """Suppressions by address (``address``: that one only)."""
        return list(
            await repository.list_suppressions(session, after=after, limit=limit, address=address)
        )

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

    # ---- feedback: webhook and DSN ------------------------------------------------------
    def verify_webhook(self, settings: Settings, body: bytes, header: str | None) -> None:
        """``Surge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``."""
        if not header:
            raise InvalidWebhookSignature("missing Surge-Signature header")
        parts = dict(p.strip().split("=", 1) for p in header.split(",") if "=" in p)
        try:
            stamp = int(parts.get("t", ""))
        except ValueError:
            raise InvalidWebhookSignature("malformed Surge-Signature header") from None
        tolerance = settings.NOTIFY_WEBHOOK_TOLERANCE.total_seconds()
        if abs(time.time() - stamp) > tolerance:
            raise InvalidWebhookSignature("signature timestamp outside the tolerance")
        expected = self.webhook_signature(settings, body, stamp).split("v1=", 1)[1]
        if not hmac.compare_digest(expected, parts.get("v1", "")):
            raise InvalidWebhookSignature("signature does not match")

    def webhook_signature(self, settings: Settings, body: bytes, stamp: int) -> str:
        """The header value a sender computes (providers and tests use this)."""
        secret = settings.NOTIFY_WEBHOOK_SECRET.get_secret_value().encode() or _derive(
            settings, "notifications.webhook"
        )
        digest = hmac.new(secret, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
        return f"t={stamp},v1={digest}"

    async def handle_event(
        self,
        session: AsyncSession,
        runtime: Runtime,
        event: ProviderEvent,
        *,
        source: str = "webhook",
    ) -> bool:
        """Apply one provider event; False when it was applied before (redelivery)."""
        settings = runtime.settings
        address = event.recipient.strip().lower()
        if not await repository.claim_external_event(
            session, source=source, external_id=event.id, address=address, event=event.type
        ):
            return False
        row = (
            await repository.get_message(session, event.message_id, for_update=True)
            if event.message_id is not None
            else None
        )
        detail = event.diagnostic or ""
        if event.type == "complained":
            await repository.add_event(session, address=address, event="complained", source=source,
                                       message_id=event.message_id, detail=detail)  # fmt: skip
            await repository.suppress(session, address, reason="complaint", source=source,
                                      detail=detail[:500] or None, expires_at=None)  # fmt: skip
            self._count(session, "complained")
        elif event.type == "bounced":
            kind = event.bounce_type or "hard"
            if kind == "soft":
                await repository.add_event(session, address=address, event="deferred",
                                           source=source, message_id=event.message_id,
                                           code=event.code, detail=detail)  # fmt: skip
                await self._after_soft_bounce(session, settings, address)
            else:
                verdict_kind = "blocked" if kind == "blocked" else "bounced"
                if row is not None and row.status in {"sent", "unconfirmed"}:
                    row.status = verdict_kind  # a later asynchronous bounce of a sent mail
                await repository.add_event(session, address=address, event=verdict_kind,
                                           source=source, message_id=event.message_id,
                                           code=event.code, detail=detail)  # fmt: skip
                self._count(session, verdict_kind)
                if verdict_kind == "bounced":
                    await self._after_hard_bounce(session, settings, address, source, detail)
        elif event.type == "delivered":
            await repository.add_event(session, address=address, event="delivered",
                                       source=source, message_id=event.message_id)  # fmt: skip
            self._count(session, "delivered")
        elif event.type == "unsubscribed":
            if row is not None and row.user_id is not None:
                await repository.set_preference(session, row.user_id, row.category, False)
            else:
                await repository.suppress(session, address, reason="manual", source=source,
                                          detail="unsubscribed", expires_at=None)  # fmt: skip
            await repository.add_event(session, address=address, event="unsubscribed",
                                       source=source, message_id=event.message_id)  # fmt: skip
            self._count(session, "unsubscribed")
        await session.flush()
        return True

    async def ingest_dsn(self, session: AsyncSession, runtime: Runtime, raw: bytes) -> int:
        """Apply an RFC 3464 bounce report (as mailed to ``NOTIFY_RETURN_PATH``); returns
        the recipients it reported on. Redeliveries of one report are applied once."""
        applied = 0
        digest = hashlib.sha256(raw).hexdigest()[:32]
        for index, recipient in enumerate(parse_dsn(raw)):
            if recipient.action not in {"failed", "delayed", "delivered"}:
                continue
            if recipient.action == "delivered":
                type_, bounce = "delivered", None
            else:
                verdict = classify(recipient.code or (500 if recipient.status.startswith("5") else 450),
                                   f"{recipient.status} {recipient.diagnostic}", "end")  # fmt: skip
                if recipient.action == "delayed" or verdict.kind == "transient":
                    bounce = "soft"
                else:
                    bounce = "blocked" if verdict.kind == "blocked" else "hard"
                type_ = "bounced"
            original = None
            if recipient.original_message_id:
                try:
                    original = UUID(recipient.original_message_id)
                except ValueError:
                    original = None
            if await self.handle_event(
                session, runtime,
                ProviderEvent(id=f"{digest}:{index}", type=type_, recipient=recipient.address,
                              message_id=original, bounce_type=bounce, code=recipient.code,
                              diagnostic=f"{recipient.status} {recipient.diagnostic}".strip()),
                source="dsn",
            ):  # fmt: skip
                applied += 1
        return applied

    # ---- users' side --------------------------------------------------------------------
    def unsubscribe_token(self, settings: Settings, user_id: UUID, category: str) -> str:
        payload = _b64(json.dumps([str(user_id), category], separators=(",", ":")).encode())
        mac = hmac.new(
            _derive(settings, "notifications.unsubscribe"), payload.encode(), hashlib.sha256
        )
        return f"{payload}.{_b64(mac.digest()[:18])}"

    def read_unsubscribe_token(self, settings: Settings, token: str) -> tuple[UUID, str]:
        payload, _, signature = token.partition(".")
        mac = hmac.new(
            _derive(settings, "notifications.unsubscribe"), payload.encode(), hashlib.sha256
        )
        try:
            if not hmac.compare_digest(_b64(mac.digest()[:18]), signature):
                raise InvalidUnsubscribeToken("invalid unsubscribe link")
            user, category = json.loads(_unb64(payload))
            return UUID(user), str(category)
        except (ValueError, TypeError) as error:
            raise InvalidUnsubscribeToken("invalid unsubscribe link") from error

    async def unsubscribe(self, session: AsyncSession, runtime: Runtime, token: str) -> str:
        """One-click unsubscribe (RFC 8058): turn the token's category off for its user."""
        user_id, category = self.read_unsubscribe_token(runtime.settings, token)
        await repository.set_preference(session, user_id, category, False)
        await repository.add_event(session, address=str(user_id), event="unsubscribed",
                                   source="link", detail=category)  # fmt: skip
        self._count(session, "unsubscribed")
        return category

    async def preferences(
        self, session: AsyncSession, runtime: Runtime, user_id: UUID
    ) -> dict[str, bool]:
        stored = await repository.preferences(session, user_id)
        for category in runtime.settings.NOTIFY_SECURITY_CATEGORIES:
            stored[category] = True
        return stored

    async def set_preferences(
        self, session: AsyncSession, runtime: Runtime, user_id: UUID, changes: dict[str, bool]
    ) -> dict[str, bool]:
        """Store the user's choices; security categories cannot be turned off (ignored)."""
        for category, enabled in changes.items():
            if category in runtime.settings.NOTIFY_SECURITY_CATEGORIES:
                continue
            await repository.set_preference(session, user_id, category, enabled)
        return await self.preferences(session, runtime, user_id)

    # ---- admin --------------------------------------------------------------------------
    async def recent(
        self,
        session: AsyncSession,
        *,
        limit: int,
        before: datetime | None = None,
        status: str | None = None,
    ) -> list[OutboxMessage]:
        return list(
            await repository.recent_messages(session, limit=limit, before=before, status=status)
        )

    async def rates(self, session: AsyncSession, *, within: timedelta = timedelta(days=1)) -> Rates:
        """Bounce and complaint rates over ``within`` (SES reviews at 5 % and 0.1 %)."""
        since = _now() - within
        totals = await repository.event_totals(session, since=since)
        sent = totals.get("sent", 0) + totals.get("unconfirmed", 0)
        return Rates(since, sent, totals.get("bounced", 0), totals.get("complained", 0))


async def check_rates(session: AsyncSession, runtime: Runtime) -> Rates:
    """Publish the window's bounce and complaint rates as gauges, and log a warning when
    one is above its threshold with enough volume to mean something."""
    settings = runtime.settings
    rates = await notifications.rates(session, within=settings.NOTIFY_RATE_WINDOW)
    BOUNCE_RATE.set(rates.bounce_rate)
    COMPLAINT_RATE.set(rates.complaint_rate)
    WINDOW_SENT.set(rates.sent)
    if rates.sent >= settings.NOTIFY_RATE_MIN_SENT:
        for name, value, limit in (
            ("bounce", rates.bounce_rate, settings.NOTIFY_BOUNCE_RATE_ALERT),
            ("complaint", rates.complaint_rate, settings.NOTIFY_COMPLAINT_RATE_ALERT),
        ):
            if value > limit:
                log.warning("notifications.rate.above_threshold", rate=name, value=round(value, 4),
                            threshold=limit, sent=rates.sent)  # fmt: skip
    return rates


def message_id_header(outbox_id: UUID, settings: Settings) -> str:
    """The Message-ID header Surge gives an outbox row (for tests and tools)."""
    return message_id(outbox_id, settings.NOTIFY_FROM)


__all__ = [
    "SEND_JOB",
    "NotificationError",
    "NotificationService",
    "Prepared",
    "ProviderEvent",
    "Rates",
    "check_rates",
    "enhanced_status",
    "message_id_header",
    "notifications",
    "smtp_relay",
]

notifications = NotificationService()
