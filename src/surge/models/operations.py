"""The operations aggregate: provider accounts, egress proxies, prices, and the operations
resellers run through the upstream provider, with one row per attempt (the timeline).

Tables are created by migration ``0006_operations``. Secrets (an account's password, a
proxy URL with credentials) are stored Fernet-encrypted (``surge.operations.secrets``).
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, Text, func, text
from sqlalchemy.orm import Mapped, mapped_column

from surge.models.base import Base


class ProviderAccount(Base):
    """A login on the provider's website. ``status``: active, disabled (by an admin),
    failed (bad credentials or locked: only an admin re-enables it). A job holds it while
    ``leased_until`` is in the future (one job at a time, fleet-wide)."""

    __tablename__ = "operations_provider_accounts"
    # No pick index: a provider has a few accounts, scanned (migration 0006).

    id: Mapped[UUID] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(Text, unique=True)
    secret: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="active")
    last_error: Mapped[str | None] = mapped_column(Text)
    failures: Mapped[int] = mapped_column(Integer, server_default="0")
    uses: Mapped[int] = mapped_column(BigInteger, server_default="0")
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    leased_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_token: Mapped[UUID | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class EgressProxy(Base):
    """An egress proxy. ``status``: active, inactive (blocked or failing: re-checked by one
    probe at ``retry_at``), disabled (by an admin). ``label`` is ``host:port`` without
    credentials (logs, admin); the URL itself is encrypted in ``secret``."""

    __tablename__ = "operations_proxies"

    id: Mapped[UUID] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(Text, unique=True)
    secret: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="active")
    reason: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    blocks: Mapped[int] = mapped_column(Integer, server_default="0")
    failures: Mapped[int] = mapped_column(Integer, server_default="0")
    requests: Mapped[int] = mapped_column(BigInteger, server_default="0")
    blocked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    probing_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Price(Base):
    """Monthly price of a package for a reseller tier, in minor units."""

    __tablename__ = "operations_prices"

    tier: Mapped[str] = mapped_column(Text, primary_key=True)
    package: Mapped[str] = mapped_column(Text, primary_key=True)
    monthly_price: Mapped[int] = mapped_column(BigInteger)


class Reseller(Base):
    """A reseller's tier (``retail`` when absent)."""

    __tablename__ = "operations_resellers"

    user_id: Mapped[UUID] = mapped_column(primary_key=True)
    tier: Mapped[str] = mapped_column(Text)


class Operation(Base):
    """One reseller operation. ``status``: queued, running, succeeded, failed,
    needs_review. ``hold_id`` is the wallet reservation; ``sent_at`` is set (and committed)
    before the state-changing call leaves, so every later attempt asks the provider first."""

    __tablename__ = "operations"
    __table_args__ = (
        Index("ix_operations_owner", "owner_id", text("created_at DESC"), text("id DESC")),
        Index(
            "ix_operations_review", "created_at", postgresql_where=text("status = 'needs_review'")
        ),
    )

    id: Mapped[UUID] = mapped_column(primary_key=True)
    owner_id: Mapped[UUID]
    kind: Mapped[str] = mapped_column(Text)
    card: Mapped[str] = mapped_column(Text)
    package: Mapped[str | None] = mapped_column(Text)
    months: Mapped[int] = mapped_column(Integer, server_default="0")
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    hold_id: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Attempt(Base):
    """One step of one attempt: which account and proxy, what happened (the timeline)."""

    __tablename__ = "operations_attempts"
    __table_args__ = (Index("ix_operations_attempts_operation", "operation_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    operation_id: Mapped[UUID] = mapped_column(ForeignKey("operations.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    account_id: Mapped[UUID | None]
    proxy_id: Mapped[UUID | None]
    outcome: Mapped[str] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
