"""An administrator's money actions taken alone, counted against a rolling budget (ADR 0066).

Four-eyes (ADR 0059) covered each action above ``APPROVAL_THRESHOLD``; many actions just
under it were still one person's word. ``admin_solo_actions`` records each one (maker,
action, subject, amount, currency, when), one row per maker, action and subject, so that
``approvals.gate`` can sum what a maker moved alone in the window.

Revision ID: 0021_solo_budget
Revises: 0020_pending_credits
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0021_solo_budget"
down_revision: str | None = "0020_pending_credits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = """
CREATE TABLE admin_solo_actions (
    maker_id uuid NOT NULL,
    action text NOT NULL,
    subject_id text NOT NULL,
    amount bigint NOT NULL,
    currency text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_admin_solo_actions PRIMARY KEY (maker_id, action, subject_id),
    CONSTRAINT ck_admin_solo_actions_amount CHECK (amount > 0)
)
"""
INDEX = "CREATE INDEX ix_admin_solo_actions_maker ON admin_solo_actions (maker_id, currency, at)"


def upgrade() -> None:
    op.execute(TABLE)
    op.execute(INDEX)


def downgrade() -> None:
    op.execute("DROP TABLE admin_solo_actions")
