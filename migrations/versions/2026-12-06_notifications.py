"""Notifications: e-mail outbox, suppressions, preferences.

Revision ID: 0008_notifications
Revises: 0007_payments
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008_notifications"
down_revision: str | None = "0007_payments"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The outbox (ADR 0019): one row per e-mail, written in the business transaction.
    op.execute(
        """
        CREATE TABLE notification_messages (
            id uuid PRIMARY KEY,
            key text NOT NULL,
            user_id uuid,
            to_address text NOT NULL,
            template text NOT NULL,
            locale text NOT NULL,
            category text NOT NULL,
            context jsonb NOT NULL DEFAULT '{}'::jsonb,
            status text NOT NULL DEFAULT 'queued',
            subject text,
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz,
            last_code integer,
            last_error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            sent_at timestamptz,
            finished_at timestamptz,
            CONSTRAINT uq_notification_messages_key UNIQUE (key),
            CONSTRAINT ck_notification_messages_status CHECK (status IN ('queued', 'sending',
                'sent', 'unconfirmed', 'bounced', 'blocked', 'failed', 'skipped', 'held'))
        )
        """
    )
    op.execute(
        "CREATE INDEX ix_notification_messages_created ON notification_messages (created_at DESC)"
    )
    op.execute(
        "CREATE INDEX ix_notification_messages_held ON notification_messages (to_address) "
        "WHERE status = 'held'"
    )
    op.execute(
        """
        CREATE TABLE notification_events (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            message_id uuid,
            address text NOT NULL,
            event text NOT NULL,
            source text NOT NULL,
            code integer,
            detail text,
            external_id text,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # A provider's event id is recorded once: a webhook delivered twice has one effect.
    op.execute(
        "CREATE UNIQUE INDEX uq_notification_events_external ON notification_events "
        "(source, external_id) WHERE external_id IS NOT NULL"
    )
    op.execute(
        "CREATE INDEX ix_notification_events_address ON notification_events "
        "(address, event, created_at)"
    )
    op.execute("CREATE INDEX ix_notification_events_created ON notification_events (created_at)")
    op.execute(
        """
        CREATE TABLE notification_suppressions (
            address text PRIMARY KEY,
            reason text NOT NULL,
            source text NOT NULL,
            detail text,
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz,
            CONSTRAINT ck_notification_suppressions_reason CHECK (reason IN ('hard_bounce',
                'complaint', 'soft_bounces', 'manual'))
        )
        """
    )
    op.execute(
        """
        CREATE TABLE notification_preferences (
            user_id uuid NOT NULL,
            category text NOT NULL,
            enabled boolean NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_notification_preferences PRIMARY KEY (user_id, category)
        )
        """
    )


def downgrade() -> None:
    for table in (
        "notification_preferences",
        "notification_suppressions",
        "notification_events",
        "notification_messages",
    ):
        op.execute(f"DROP TABLE IF EXISTS {table}")
