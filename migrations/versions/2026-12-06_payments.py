"""Payments: top-ups, payment provider events (inbox).

Revision ID: 0007_payments
Revises: 0006_operations
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_payments"
down_revision: str | None = "0006_operations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Reserved in the linear chain; filled by the work it is named after.
    op.execute("SELECT 1")


def downgrade() -> None:
    pass
