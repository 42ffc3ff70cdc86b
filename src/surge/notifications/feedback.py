"""Feedback: the signed provider webhook and RFC 3464 bounce reports (ADR 0019)."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from surge.config import Settings
from surge.kit.runtime import Runtime
from surge.notifications import repository
from surge.notifications.dsn import parse_dsn
from surge.notifications.errors import InvalidWebhookSignature
from surge.notifications.keys import derive
from surge.notifications.metrics import count
from surge.notifications.smtp import classify
from surge.notifications.suppressions import after_hard_bounce, after_soft_bounce


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


class FeedbackUseCases:
    """Provider events and DSNs, each applied once."""

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
        secret = settings.NOTIFY_WEBHOOK_SECRET.get_secret_value().encode() or derive(
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
            count(session, "complained")
        elif event.type == "bounced":
            kind = event.bounce_type or "hard"
            if kind == "soft":
                await repository.add_event(session, address=address, event="deferred",
                                           source=source, message_id=event.message_id,
                                           code=event.code, detail=detail)  # fmt: skip
                await after_soft_bounce(session, settings, address)
            else:
                verdict_kind = "blocked" if kind == "blocked" else "bounced"
                if row is not None and row.status in {"sent", "unconfirmed"}:
                    row.status = verdict_kind  # a later asynchronous bounce of a sent mail
                await repository.add_event(session, address=address, event=verdict_kind,
                                           source=source, message_id=event.message_id,
                                           code=event.code, detail=detail)  # fmt: skip
                count(session, verdict_kind)
                if verdict_kind == "bounced":
                    await after_hard_bounce(session, settings, address, source, detail)
        elif event.type == "delivered":
            await repository.add_event(session, address=address, event="delivered",
                                       source=source, message_id=event.message_id)  # fmt: skip
            count(session, "delivered")
        elif event.type == "unsubscribed":
            if row is not None and row.user_id is not None:
                await repository.set_preference(session, row.user_id, row.category, False)
            else:
                await repository.suppress(session, address, reason="manual", source=source,
                                          detail="unsubscribed", expires_at=None)  # fmt: skip
            await repository.add_event(session, address=address, event="unsubscribed",
                                       source=source, message_id=event.message_id)  # fmt: skip
            count(session, "unsubscribed")
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
