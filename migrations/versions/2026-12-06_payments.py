"""Payments: top-ups, payment provider events (inbox).

``payment_topups`` is one row per payment intent Surge asked the provider for (its id is
derived from the owner and the client's Idempotency-Key, so a retry after a crash finds the
same row); ``payment_events`` is the inbox of signed provider events, keyed by the
provider's event id (a replay is a primary-key conflict). Money itself is only in the
ledger, posted with the provider's payment id as the transfer's idempotency key (ADR 0018).

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


SCHEMA = """
CREATE TABLE payment_topups (
    id                  UUID        NOT NULL,
    owner_id            UUID        NOT NULL,
    amount              BIGINT      NOT NULL,
    currency            TEXT        NOT NULL,
    status              TEXT        NOT NULL,
    provider_payment_id TEXT,
    next_action_url     TEXT,
    failure_code        TEXT,
    amount_credited     BIGINT      NOT NULL DEFAULT 0,
    amount_reversed     BIGINT      NOT NULL DEFAULT 0,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Last time Surge learnt something about it (a change, or a reconciliation poll): the
    -- poll takes the least recently checked first, so a payer who never finishes a second
    -- step cannot starve the others.
    checked_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_payment_topups PRIMARY KEY (id),
    CONSTRAINT uq_payment_topups_provider_payment_id UNIQUE (provider_payment_id),
    CONSTRAINT ck_payment_topups_amount CHECK (amount > 0),
    CONSTRAINT ck_payment_topups_currency CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT ck_payment_topups_status CHECK (status IN ('pending', 'requires_action',
        'processing', 'succeeded', 'failed', 'refunded', 'disputed'))
);
CREATE INDEX ix_payment_topups_owner ON payment_topups (owner_id, created_at DESC, id DESC);
-- The reconciliation job's scan: only intents still open, oldest first.
CREATE INDEX ix_payment_topups_open ON payment_topups (checked_at)
    WHERE status IN ('pending', 'requires_action', 'processing');

CREATE TABLE payment_events (
    id           TEXT        NOT NULL,
    type         TEXT        NOT NULL,
    payment_id   TEXT        NOT NULL,
    created      BIGINT      NOT NULL,
    payload      JSONB       NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    processed_at TIMESTAMPTZ,
    state        TEXT        NOT NULL DEFAULT 'pending',
    attempts     INTEGER     NOT NULL DEFAULT 0,
    last_error   TEXT,
    CONSTRAINT pk_payment_events PRIMARY KEY (id),
    CONSTRAINT ck_payment_events_state CHECK (state IN ('pending', 'processed', 'dead'))
);
CREATE INDEX ix_payment_events_pending ON payment_events (payment_id, created, received_at)
    WHERE state = 'pending';
CREATE INDEX ix_payment_events_state ON payment_events (state, received_at DESC, id);
"""


def upgrade() -> None:
    # One statement per call: asyncpg prepares each statement, and a prepared statement
    # holds exactly one command.
    for statement in SCHEMA.split(";"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS payment_events")
    op.execute("DROP TABLE IF EXISTS payment_topups")
