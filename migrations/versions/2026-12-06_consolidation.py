"""Consolidation: monotonic entry sequence for history ordering, audit module.

Revision ID: 0005_consolidation
Revises: 0004_wallet
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_consolidation"
down_revision: str | None = "0004_wallet"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Reserved in the linear chain; filled by the work it is named after.
    op.execute("SELECT 1")


def downgrade() -> None:
    pass
