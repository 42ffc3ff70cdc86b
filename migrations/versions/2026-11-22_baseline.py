"""Baseline: extensions every later migration may rely on.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0001_baseline"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # gen_random_uuid() is built in since PostgreSQL 13; nothing else is needed yet.
    op.execute("SELECT 1")


def downgrade() -> None:
    pass
