"""The payments aggregate: top-ups and the inbox of provider events (migration 0007).

Money is not here: a top-up's credit and reversals are ledger transfers keyed by the
provider's payment id (ADR 0018); ``amount_credited`` / ``amount_reversed`` mirror them for
display only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import BigInteger, DateTime, Index, Integer, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from surge.models.base import Base


class Topup(Base):
    """A top-up the owner asked for: one payment intent at the provider."""

    __tablename__ = "payment_topups"
    __table_args__ = (
        Index("ix_payment_topups_owner", "owner_id", text("created_at DESC"), text("id DESC")),
        Index(
            "ix_payment_topups_open",
            "checked_at",
            postgresql_where=text("status IN ('pending', 'requires_action', 'processing')"),
        ),
    )

    id: Mapped[UUID] = mapped_column(primary_key=True)
    owner_id: Mapped[UUID]
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    provider_payment_id: Mapped[str | None] = mapped_column(Text, unique=True)
    next_action_url: Mapped[str | None] = mapped_column(Text)
    failure_code: Mapped[str | None] = mapped_column(Text)
    amount_credited: Mapped[int] = mapped_column(BigInteger, server_default="0")
    amount_reversed: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PaymentEvent(Base):
    """One signed event from the provider, stored before it is acted on (the inbox)."""

    __tablename__ = "payment_events"
    __table_args__ = (
        Index(
            "ix_payment_events_pending",
            "payment_id",
            "created",
            "received_at",
            postgresql_where=text("state = 'pending'"),
        ),
        Index("ix_payment_events_state", "state", text("received_at DESC"), "id"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    payment_id: Mapped[str] = mapped_column(Text)
    created: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(Text, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
