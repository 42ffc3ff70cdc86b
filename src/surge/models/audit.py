"""The audit log (seed 004): who did what to which subject, when, with before/after.

Append-only. Every domain writes to it through ``surge.identity.service.audit`` inside its
own unit of work, so an audited change and its audit row commit or roll back together.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Identity, Index, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from surge.models.base import Base


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_subject", "subject_type", "subject_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
    #: The acting user; None for the system (jobs, CLI).
    actor_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), index=True)
    action: Mapped[str] = mapped_column(Text, nullable=False)
    subject_type: Mapped[str] = mapped_column(Text, nullable=False)
    subject_id: Mapped[str] = mapped_column(Text, nullable=False)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    request_id: Mapped[str | None] = mapped_column(Text)


class AdminApproval(Base):
    """An administrator's money action waiting for a second administrator (four-eyes,
    ADR 0059): recorded ``pending`` by its maker, then ``approved`` (and executed, in the
    same transaction) or ``rejected`` by a different admin, or ``expired`` unanswered.
    At most one pending request per action and subject (``uq_admin_approvals_pending``)."""

    __tablename__ = "admin_approvals"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'approved', 'rejected', 'expired')",
            name="ck_admin_approvals_status",
        ),
        CheckConstraint("amount >= 0", name="ck_admin_approvals_amount"),
        CheckConstraint(
            "checker_id IS NULL OR checker_id <> maker_id", name="ck_admin_approvals_four_eyes"
        ),
        Index(
            "uq_admin_approvals_pending",
            "action",
            "subject_id",
            unique=True,
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_admin_approvals_status", "status", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    action: Mapped[str] = mapped_column(Text, nullable=False)
    subject_type: Mapped[str] = mapped_column(Text, nullable=False)
    subject_id: Mapped[str] = mapped_column(Text, nullable=False)
    #: What the action moves or creates, in minor units (what the threshold compared).
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str | None] = mapped_column(Text)
    #: What the executor needs to carry the action out, as the maker asked it.
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="pending")
    maker_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    checker_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    reason: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AdminSoloAction(Base):
    """A money action an administrator carried out alone (within ``APPROVAL_THRESHOLD``),
    counted against their ``APPROVAL_SOLO_BUDGET`` (ADR 0066). Written by
    ``approvals.gate`` in the action's own transaction: rolled back with it. One row per
    administrator, action and subject, so a retried action is counted once."""

    __tablename__ = "admin_solo_actions"
    __table_args__ = (
        CheckConstraint("amount > 0", name="ck_admin_solo_actions_amount"),
        Index("ix_admin_solo_actions_maker", "maker_id", "currency", "at"),
    )

    maker_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    action: Mapped[str] = mapped_column(Text, primary_key=True)
    subject_id: Mapped[str] = mapped_column(Text, primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(Text, nullable=False)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
