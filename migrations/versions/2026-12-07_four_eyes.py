"""Four-eyes: an administrator's money action above a threshold waits for a second
administrator (ADR 0059).

``admin_approvals`` holds each request: its action and subject, the amount the threshold
compared, what the executor needs (``params``), the maker, and — once decided — the checker,
who can never be the maker (``ck_admin_approvals_four_eyes``, on top of the service's own
check). ``service_keys.activated_at``: a new key waits for a second administrator too (the
keys already issued are marked activated). One pending request per action and subject (``uq_admin_approvals_pending``): a maker
who asks twice finds the same request, two makers cannot queue two payouts of one withdrawal.

Revision ID: 0018_four_eyes
Revises: 0017_outbox_hot_updates
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0018_four_eyes"
down_revision: str | None = "0017_outbox_hot_updates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = """
CREATE TABLE admin_approvals (
    id uuid PRIMARY KEY,
    action text NOT NULL,
    subject_type text NOT NULL,
    subject_id text NOT NULL,
    amount bigint NOT NULL,
    currency text,
    params jsonb NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    maker_id uuid NOT NULL,
    checker_id uuid,
    reason text,
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    decided_at timestamptz,
    CONSTRAINT ck_admin_approvals_status
        CHECK (status IN ('pending', 'approved', 'rejected', 'expired')),
    CONSTRAINT ck_admin_approvals_amount CHECK (amount >= 0),
    CONSTRAINT ck_admin_approvals_four_eyes CHECK (checker_id IS NULL OR checker_id <> maker_id)
)
"""
INDEXES = (
    "CREATE UNIQUE INDEX uq_admin_approvals_pending ON admin_approvals (action, subject_id) "
    "WHERE status = 'pending'",
    "CREATE INDEX ix_admin_approvals_status ON admin_approvals (status, created_at, id)",
)


#: A service key records revenue events (money) on its own: one administrator minting one
#: was a way around four-eyes. A new key is born inactive; the keys in use stay valid.
KEYS = (
    "ALTER TABLE service_keys ADD COLUMN activated_at timestamptz",
    "UPDATE service_keys SET activated_at = created_at",
)


def upgrade() -> None:
    op.execute(TABLE)
    for statement in (*INDEXES, *KEYS):
        op.execute(statement)


def downgrade() -> None:
    op.execute("ALTER TABLE service_keys DROP COLUMN activated_at")
    op.execute("DROP TABLE admin_approvals")
