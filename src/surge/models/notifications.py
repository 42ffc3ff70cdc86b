"""The notifications aggregate: the e-mail outbox, its event log, suppressions and
per-user preferences (tables created by migration ``0008_notifications``; ADR 0019)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import BigInteger, Boolean, DateTime, Identity, Index, Integer, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from surge.models.base import Base


class OutboxMessage(Base):
    """One e-mail, written in the transaction of the business change that causes it.

    ``status``: ``queued`` (waiting for its next attempt) → ``sending`` (the end of DATA is
    about to go on the wire; see ADR 0019's crash windows) → ``sent``; or a final
    ``unconfirmed`` (the worker died after the end of DATA: assumed delivered, never resent),
    ``bounced`` (permanent 5xx), ``blocked`` (reputation/policy 5.7.x), ``failed`` (transient
    failures past ``NOTIFY_MAX_AGE``), ``skipped`` (the user opted out of the category);
    ``held`` while the address is suppressed (re-queued when the suppression is lifted)."""

    __tablename__ = "notification_messages"
    __table_args__ = (
        Index("ix_notification_messages_created", text("created_at DESC")),
        # Not partial on ``status``: a column in an index predicate makes every status update
        # non-HOT (ADR 0046); the fillfactor leaves room for the new version in the page.
        Index("ix_notification_messages_address", "to_address"),
        {"postgresql_with": {"fillfactor": 70}},
    )

    id: Mapped[UUID] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(Text, unique=True)
    user_id: Mapped[UUID | None]
    to_address: Mapped[str] = mapped_column(Text)
    template: Mapped[str] = mapped_column(Text)
    locale: Mapped[str] = mapped_column(Text)
    category: Mapped[str] = mapped_column(Text)
    context: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    subject: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NotificationEvent(Base):
    """The normalized event log (django-anymail's vocabulary): ``sent``, ``bounced``,
    ``blocked``, ``failed``, ``deferred``, ``unconfirmed``, ``held``, ``skipped``,
    ``complained``, ``delivered``, ``unsubscribed``. ``deferred`` rows are per try (they
    count soft bounces); every other row is final for its message."""

    __tablename__ = "notification_events"
    __table_args__ = (
        Index("ix_notification_events_address", "address", "event", "created_at"),
        Index("ix_notification_events_created", "created_at"),
        Index(
            "uq_notification_events_external",
            "source",
            "external_id",
            unique=True,
            postgresql_where=text("external_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    message_id: Mapped[UUID | None]
    address: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    code: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text)
    """A provider's event id (webhooks): unique per source."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Suppression(Base):
    """An address Surge does not send to (until ``expires_at``, or for good when NULL).
    ``reason``: ``hard_bounce``, ``complaint``, ``soft_bounces``, ``manual``."""

    __tablename__ = "notification_suppressions"

    address: Mapped[str] = mapped_column(Text, primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Preference(Base):
    """A user's choice for one category (no row: the category's default, which is on)."""

    __tablename__ = "notification_preferences"

    user_id: Mapped[UUID] = mapped_column(primary_key=True)
    category: Mapped[str] = mapped_column(Text, primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
