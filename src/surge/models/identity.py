"""Identity aggregate: users, their sessions and refresh tokens, and their subscription.

``active_subscriptions`` (seed 003) is a materialized view over ``subscriptions``, created by
the migration and refreshed by a periodic job; it has no ORM class (read with SQL).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Mapped, mapped_column

from surge.models.base import Base, TimestampMixin

ROLES = ("user", "partner", "reseller", "admin")


class User(TimestampMixin, Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint(
            "role IN ('user', 'partner', 'reseller', 'admin', 'admin_readonly')", name="role"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )
    #: Stored lower-cased; unique.
    email: Mapped[str] = mapped_column(Text, unique=True, nullable=False)
    #: TR39 skeleton of the e-mail (surge.kit.security.confusables): unique, so a look-alike
    #: of an existing address cannot register (migration 0009_console).
    email_skeleton: Mapped[str | None] = mapped_column(Text, unique=True)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)
    role: Mapped[str] = mapped_column(Text, nullable=False, server_default="user")
    mfa_secret: Mapped[str | None] = mapped_column(Text)
    mfa_enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    #: Last TOTP time step accepted: a code for this step or older is a replay.
    mfa_last_step: Mapped[int | None] = mapped_column(BigInteger)
    mfa_backup_codes: Mapped[list[str]] = mapped_column(
        ARRAY(Text), nullable=False, server_default="{}"
    )
    #: Per-user not-before: access tokens issued earlier are refused ("log out everywhere").
    tokens_valid_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuthSession(Base):
    """One signed-in device: a refresh-token family."""

    __tablename__ = "auth_sessions"
    __table_args__ = (
        # The 5-session cap and the device list read the live sessions of one user.
        Index(
            "ix_auth_sessions_user_live",
            "user_id",
            "created_at",
            postgresql_where=text("revoked_at IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
    last_used_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoke_reason: Mapped[str | None] = mapped_column(Text)
    mfa_verified: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    user_agent: Mapped[str | None] = mapped_column(Text)
    ip: Mapped[str | None] = mapped_column(Text)


class RefreshToken(Base):
    """Every refresh token ever issued for a session, hashed. A used one presented again is
    a replay: the whole session (family) is revoked (RFC 9700 §4.14.2)."""

    __tablename__ = "refresh_tokens"

    token_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    session_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        ForeignKey("auth_sessions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Subscription(Base):
    """A user's plan. No row, or an expired one, means the free plan."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        # Seed 003's composite index: the materialized view is built from it (index-only).
        Index("ix_subscriptions_user_plan_expiry", "user_id", "plan", "expires_at"),
        # Seed 003's partial index: only paid plans are interesting to the view.
        Index(
            "ix_subscriptions_paid_expiry",
            "expires_at",
            postgresql_where=text("plan <> 'free'"),
        ),
        # The read path overlays rows changed since the last view refresh.
        Index("ix_subscriptions_updated_at", "updated_at"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    plan: Mapped[str] = mapped_column(Text, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )


class ViewRefresh(Base):
    """When each materialized view was last refreshed (the snapshot the view reflects)."""

    __tablename__ = "view_refreshes"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    refreshed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
