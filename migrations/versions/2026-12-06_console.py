"""Console: service API keys, admin roles, metric time series.

Revision ID: 0009_console
Revises: 0008_notifications
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009_console"
down_revision: str | None = "0008_notifications"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Reserved in the linear chain; filled by the work it is named after.
    op.execute("SELECT 1")


def downgrade() -> None:
    pass
