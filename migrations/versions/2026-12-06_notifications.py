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
    # Reserved in the linear chain; filled by the work it is named after.
    op.execute("SELECT 1")


def downgrade() -> None:
    pass
