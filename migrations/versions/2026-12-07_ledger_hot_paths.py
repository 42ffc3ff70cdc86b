"""Ledger hot paths: ``wallet_transfer_batch``, many standalone transfers in one statement.

``Ledger.transfer_now`` coalesces the standalone transfers that arrive while another is in
flight into one call of this function: one round trip, one transaction, one WAL flush for
the lot. Every account of the batch is locked first, in id order (two batches, or a batch
and a unit of work, queue instead of deadlocking), then each transfer runs through
``wallet_transfer`` in input order, so each keeps its idempotency key, its own entries and
an exact balance before/after. A failure rolls the whole batch back; the caller then runs
its transfers one by one, so each gets its own answer (ADR 0024).

Revision ID: 0013_ledger_hot_paths
Revises: 0012_jobs_hot_paths
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy.util.concurrency import await_

revision: str = "0013_ledger_hot_paths"
down_revision: str | None = "0012_jobs_hot_paths"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = r"""
CREATE FUNCTION wallet_transfer_batch(
    p_keys TEXT[], p_debits BIGINT[], p_credits BIGINT[], p_amounts BIGINT[],
    p_currencies TEXT[], p_kinds TEXT[], p_references TEXT[]
) RETURNS TABLE (transfer_id BIGINT, created BOOLEAN, debit_balance BIGINT, credit_balance BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM wallet_accounts WHERE id = ANY(p_debits || p_credits) ORDER BY id FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
        RETURN QUERY SELECT t.transfer_id, t.created, t.debit_balance, t.credit_balance
            FROM wallet_transfer(p_keys[i], p_debits[i], p_credits[i], p_amounts[i],
                                 p_currencies[i], p_kinds[i], p_references[i], false) AS t;
    END LOOP;
END $$;
"""


def _script(sql: str) -> None:
    """Run SQL as is (simple query protocol): ``op.execute`` would read PL/pgSQL's ``:=``
    and ``::`` as bind parameters."""
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    await_(driver.execute(sql))


def upgrade() -> None:
    _script(FUNCTIONS)


def downgrade() -> None:
    _script(
        "DROP FUNCTION IF EXISTS wallet_transfer_batch(TEXT[], BIGINT[], BIGINT[], BIGINT[],"
        " TEXT[], TEXT[], TEXT[]);"
    )
