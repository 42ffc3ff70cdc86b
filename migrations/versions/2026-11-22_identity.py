"""Identity: users, sessions and refresh tokens, subscriptions, the active_subscriptions
materialized view (seed 003) and the audit log (seed 004).

Revision ID: 0003_identity
Revises: 0002_jobs
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_identity"
down_revision: str | None = "0002_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UUID = postgresql.UUID(as_uuid=True)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False, server_default="user"),
        sa.Column("mfa_secret", sa.Text()),
        sa.Column("mfa_enabled", sa.Boolean(), nullable=False, server_default="false"),
        sa.Column("mfa_last_step", sa.BigInteger()),
        sa.Column(
            "mfa_backup_codes", postgresql.ARRAY(sa.Text()), nullable=False, server_default="{}"
        ),
        sa.Column("tokens_valid_after", TS),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint(
            "role IN ('user', 'partner', 'reseller', 'admin')", name=op.f("ck_users_role")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
    )
    op.create_table(
        "auth_sessions",
        sa.Column("id", UUID, server_default=sa.text("gen_random_uuid()")),
        sa.Column("user_id", UUID, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("last_used_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revoked_at", TS),
        sa.Column("revoke_reason", sa.Text()),
        sa.Column("mfa_verified", sa.Boolean(), nullable=False, server_default="false"),
        sa.Column("user_agent", sa.Text()),
        sa.Column("ip", sa.Text()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_sessions")),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], ondelete="CASCADE",
            name=op.f("fk_auth_sessions_user_id_users"),
        ),
    )  # fmt: skip
    op.create_index(
        "ix_auth_sessions_user_live",
        "auth_sessions",
        ["user_id", "created_at"],
        postgresql_where=sa.text("revoked_at IS NULL"),
    )
    op.create_table(
        "refresh_tokens",
        sa.Column("token_hash", sa.Text()),
        sa.Column("session_id", UUID, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("used_at", TS),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_refresh_tokens")),
        sa.ForeignKeyConstraint(
            ["session_id"], ["auth_sessions.id"], ondelete="CASCADE",
            name=op.f("fk_refresh_tokens_session_id_auth_sessions"),
        ),
    )  # fmt: skip
    op.create_index("ix_refresh_tokens_session_id", "refresh_tokens", ["session_id"])
    op.create_table(
        "subscriptions",
        sa.Column("user_id", UUID),
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("expires_at", TS),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_subscriptions")),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], ondelete="CASCADE",
            name=op.f("fk_subscriptions_user_id_users"),
        ),
    )  # fmt: skip
    # Seed 003's indexes: composite (builds the view index-only) and partial (paid plans).
    op.create_index(
        "ix_subscriptions_user_plan_expiry", "subscriptions", ["user_id", "plan", "expires_at"]
    )
    op.create_index(
        "ix_subscriptions_paid_expiry",
        "subscriptions",
        ["expires_at"],
        postgresql_where=sa.text("plan <> 'free'"),
    )
    op.create_index("ix_subscriptions_updated_at", "subscriptions", ["updated_at"])
    op.create_table(
        "view_refreshes",
        sa.Column("name", sa.Text()),
        sa.Column("refreshed_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_view_refreshes")),
    )
    # Seed 003: pre-computed live paid subscriptions; users absent from it are on "free".
    op.execute(
        """
        CREATE MATERIALIZED VIEW active_subscriptions AS
        SELECT s.user_id, s.plan, s.expires_at
        FROM subscriptions s
        WHERE s.plan <> 'free' AND (s.expires_at IS NULL OR s.expires_at > now())
        """
    )
    # REFRESH ... CONCURRENTLY needs a unique index on the view.
    op.execute("CREATE UNIQUE INDEX ux_active_subscriptions_user ON active_subscriptions (user_id)")
    op.execute(
        "CREATE INDEX ix_active_subscriptions_plan ON active_subscriptions (plan, expires_at)"
    )
    op.execute(
        "INSERT INTO view_refreshes (name, refreshed_at) VALUES ('active_subscriptions', now())"
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity()),
        sa.Column("at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("actor_id", UUID),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("subject_type", sa.Text(), nullable=False),
        sa.Column("subject_id", sa.Text(), nullable=False),
        sa.Column("before", postgresql.JSONB()),
        sa.Column("after", postgresql.JSONB()),
        sa.Column("request_id", sa.Text()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index("ix_audit_log_subject", "audit_log", ["subject_type", "subject_id", "id"])
    op.create_index("ix_audit_log_actor_id", "audit_log", ["actor_id"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.execute("DROP MATERIALIZED VIEW IF EXISTS active_subscriptions")
    op.drop_table("view_refreshes")
    op.drop_table("subscriptions")
    op.drop_table("refresh_tokens")
    op.drop_table("auth_sessions")
    op.drop_table("users")
