"""Capacity: indexes and settings the load tests showed were needed.

Revision ID: 0010_capacity
Revises: 0009_console
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010_capacity"
down_revision: str | None = "0009_console"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Reserved in the linear chain; filled by the work it is named after.
    op.execute("SELECT 1")


def downgrade() -> None:
    pass
