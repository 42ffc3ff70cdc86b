"""Wallet top-up totals: a wallet's net top-up credit and posted purchases as running totals.

ADR 0033's ``withdrawable = available − max(0, net top-ups − posted purchases)`` summed every
entry of the wallet against the payments or the sales account on each read: a reseller with
a million purchases paid a million-row scan per wallet read. Two columns on the account row
now hold those sums (ADR 0036), kept by the ledger's own functions in the posting's
transaction, under the row lock the posting already holds:

- ``topup_net``: the sum of the account's entries whose counterparty is a ``payments``
  account (top-up credits minus their reversals: refunds, disputes; plus won disputes);
- ``purchases_posted``: minus the sum of its entries whose counterparty is a ``sales``
  account (posted purchases minus what sales gave back).

Only a posting with a ``payments`` or ``sales`` account on one side writes them: the lock
query that already reads both rows now also reads their ``code``, and a transfer between
two ordinary accounts takes no other step. The backfill runs after ``ALTER TABLE``, whose
ACCESS EXCLUSIVE lock holds every posting off until this migration commits, so no posting
can fall between the sums and the new functions.

Revision ID: 0014_wallet_topup_totals
Revises: 0013_ledger_hot_paths
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

from alembic import op
from sqlalchemy.util.concurrency import await_

revision: str = "0014_wallet_topup_totals"
down_revision: str | None = "0013_ledger_hot_paths"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = """
ALTER TABLE wallet_accounts
    ADD COLUMN topup_net BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN purchases_posted BIGINT NOT NULL DEFAULT 0;
UPDATE wallet_accounts a
    SET topup_net = f.topup_net, purchases_posted = f.purchases_posted
    FROM (SELECT e.account_id,
                 coalesce(sum(e.amount) FILTER (WHERE c.code = 'payments'), 0) AS topup_net,
                 coalesce(-sum(e.amount) FILTER (WHERE c.code = 'sales'), 0) AS purchases_posted
          FROM wallet_entries e JOIN wallet_accounts c ON c.id = e.counterparty_account_id
          WHERE c.code IN ('payments', 'sales')
          GROUP BY e.account_id) f
    WHERE f.account_id = a.id;
"""

# The two ledger functions of migration 0004 with the totals: both lock their two accounts
# with one statement that now also reads their codes; the totals' UPDATE runs only when a
# side is a payments or sales account (the row is locked and was just written: no new wait).
FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION wallet_transfer(
    p_key TEXT, p_debit BIGINT, p_credit BIGINT, p_amount BIGINT, p_currency TEXT,
    p_kind TEXT, p_reference TEXT, p_pending BOOLEAN
) RETURNS TABLE (transfer_id BIGINT, created BOOLEAN, debit_balance BIGINT, credit_balance BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_id BIGINT;
    v_phase TEXT := CASE WHEN p_pending THEN 'pending' ELSE 'single' END;
    v_old wallet_transfers%ROWTYPE;
    v_locked INTEGER;
    v_debit_code TEXT;
    v_credit_code TEXT;
    v_debit_after BIGINT;
    v_credit_after BIGINT;
BEGIN
    IF p_debit = p_credit THEN
        RAISE EXCEPTION 'a transfer needs two different accounts' USING ERRCODE = 'WL422';
    END IF;
    SELECT count(*), max(l.code) FILTER (WHERE l.id = p_debit),
           max(l.code) FILTER (WHERE l.id = p_credit)
        INTO v_locked, v_debit_code, v_credit_code
        FROM (SELECT a.id, a.code FROM wallet_accounts a
              WHERE a.id IN (p_debit, p_credit) AND a.currency = p_currency
              ORDER BY a.id FOR UPDATE) l;
    IF v_locked <> 2 THEN
        RAISE EXCEPTION 'accounts % and % do not both exist in %', p_debit, p_credit, p_currency
            USING ERRCODE = 'WL404';
    END IF;
    INSERT INTO wallet_transfers AS t (idempotency_key, debit_account_id, credit_account_id,
                                       amount, currency, phase, kind, reference)
        VALUES (p_key, p_debit, p_credit, p_amount, p_currency, v_phase, p_kind, p_reference)
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING t.id INTO v_id;
    IF v_id IS NULL THEN
        SELECT * INTO v_old FROM wallet_transfers t WHERE t.idempotency_key = p_key;
        IF (v_old.debit_account_id, v_old.credit_account_id, v_old.amount, v_old.currency,
            v_old.phase) IS DISTINCT FROM (p_debit, p_credit, p_amount, p_currency, v_phase) THEN
            RAISE EXCEPTION 'idempotency key % was used for a different transfer', p_key
                USING ERRCODE = 'WL409';
        END IF;
        RETURN QUERY SELECT v_old.id, false,
            (SELECT a.balance FROM wallet_accounts a WHERE a.id = p_debit),
            (SELECT a.balance FROM wallet_accounts a WHERE a.id = p_credit);
        RETURN;
    END IF;
    IF p_pending THEN
        UPDATE wallet_accounts a SET pending_out = a.pending_out + p_amount, updated_at = now()
            WHERE a.id = p_debit RETURNING a.balance INTO v_debit_after;
        UPDATE wallet_accounts a SET pending_in = a.pending_in + p_amount, updated_at = now()
            WHERE a.id = p_credit RETURNING a.balance INTO v_credit_after;
    ELSE
        UPDATE wallet_accounts a SET balance = a.balance - p_amount, updated_at = now()
            WHERE a.id = p_debit RETURNING a.balance INTO v_debit_after;
        UPDATE wallet_accounts a SET balance = a.balance + p_amount, updated_at = now()
            WHERE a.id = p_credit RETURNING a.balance INTO v_credit_after;
        INSERT INTO wallet_entries (account_id, transfer_id, counterparty_account_id, amount,
                                    balance_before, balance_after, kind, reference)
        VALUES (p_debit, v_id, p_credit, -p_amount, v_debit_after + p_amount, v_debit_after,
                p_kind, p_reference),
               (p_credit, v_id, p_debit, p_amount, v_credit_after - p_amount, v_credit_after,
                p_kind, p_reference);
        IF v_credit_code IN ('payments', 'sales') THEN
            PERFORM wallet_track_flows(p_debit, v_credit_code, -p_amount);
        END IF;
        IF v_debit_code IN ('payments', 'sales') THEN
            PERFORM wallet_track_flows(p_credit, v_debit_code, p_amount);
        END IF;
    END IF;
    RETURN QUERY SELECT v_id, true, v_debit_after, v_credit_after;
END $$;

CREATE OR REPLACE FUNCTION wallet_resolve(
    p_key TEXT, p_pending_id BIGINT, p_post BOOLEAN, p_kind TEXT
) RETURNS TABLE (transfer_id BIGINT, created BOOLEAN, debit_balance BIGINT, credit_balance BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_p wallet_transfers%ROWTYPE;
    v_id BIGINT;
    v_phase TEXT := CASE WHEN p_post THEN 'post' ELSE 'void' END;
    v_old wallet_transfers%ROWTYPE;
    v_debit_code TEXT;
    v_credit_code TEXT;
    v_debit_after BIGINT;
    v_credit_after BIGINT;
BEGIN
    SELECT * INTO v_p FROM wallet_transfers t WHERE t.id = p_pending_id AND t.phase = 'pending';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no pending transfer %', p_pending_id USING ERRCODE = 'WL404';
    END IF;
    SELECT max(l.code) FILTER (WHERE l.id = v_p.debit_account_id),
           max(l.code) FILTER (WHERE l.id = v_p.credit_account_id)
        INTO v_debit_code, v_credit_code
        FROM (SELECT a.id, a.code FROM wallet_accounts a
              WHERE a.id IN (v_p.debit_account_id, v_p.credit_account_id)
              ORDER BY a.id FOR UPDATE) l;
    INSERT INTO wallet_transfers AS t (idempotency_key, debit_account_id, credit_account_id,
                                       amount, currency, phase, pending_id, kind, reference)
        VALUES (p_key, v_p.debit_account_id, v_p.credit_account_id, v_p.amount, v_p.currency,
                v_phase, v_p.id, p_kind, v_p.reference)
        ON CONFLICT DO NOTHING
        RETURNING t.id INTO v_id;
    IF v_id IS NULL THEN
        SELECT * INTO v_old FROM wallet_transfers t WHERE t.idempotency_key = p_key;
        IF FOUND THEN
            IF (v_old.pending_id, v_old.phase) IS DISTINCT FROM (p_pending_id, v_phase) THEN
                RAISE EXCEPTION 'idempotency key % was used for a different transfer', p_key
                    USING ERRCODE = 'WL409';
            END IF;
            RETURN QUERY SELECT v_old.id, false,
                (SELECT a.balance FROM wallet_accounts a WHERE a.id = v_p.debit_account_id),
                (SELECT a.balance FROM wallet_accounts a WHERE a.id = v_p.credit_account_id);
            RETURN;
        END IF;
        RAISE EXCEPTION 'pending transfer % is already resolved', p_pending_id
            USING ERRCODE = 'WL410';
    END IF;
    IF p_post THEN
        UPDATE wallet_accounts a
            SET balance = a.balance - v_p.amount, pending_out = a.pending_out - v_p.amount,
                updated_at = now()
            WHERE a.id = v_p.debit_account_id RETURNING a.balance INTO v_debit_after;
        UPDATE wallet_accounts a
            SET balance = a.balance + v_p.amount, pending_in = a.pending_in - v_p.amount,
                updated_at = now()
            WHERE a.id = v_p.credit_account_id RETURNING a.balance INTO v_credit_after;
        INSERT INTO wallet_entries (account_id, transfer_id, counterparty_account_id, amount,
                                    balance_before, balance_after, kind, reference)
        VALUES (v_p.debit_account_id, v_id, v_p.credit_account_id, -v_p.amount,
                v_debit_after + v_p.amount, v_debit_after, p_kind, v_p.reference),
               (v_p.credit_account_id, v_id, v_p.debit_account_id, v_p.amount,
                v_credit_after - v_p.amount, v_credit_after, p_kind, v_p.reference);
        IF v_credit_code IN ('payments', 'sales') THEN
            PERFORM wallet_track_flows(v_p.debit_account_id, v_credit_code, -v_p.amount);
        END IF;
        IF v_debit_code IN ('payments', 'sales') THEN
            PERFORM wallet_track_flows(v_p.credit_account_id, v_debit_code, v_p.amount);
        END IF;
    ELSE
        UPDATE wallet_accounts a SET pending_out = a.pending_out - v_p.amount, updated_at = now()
            WHERE a.id = v_p.debit_account_id RETURNING a.balance INTO v_debit_after;
        UPDATE wallet_accounts a SET pending_in = a.pending_in - v_p.amount, updated_at = now()
            WHERE a.id = v_p.credit_account_id RETURNING a.balance INTO v_credit_after;
    END IF;
    RETURN QUERY SELECT v_id, true, v_debit_after, v_credit_after;
END $$;
"""

# One posted entry of ``p_amount`` (signed, on ``p_account``) against a payments or sales
# account moves the matching total. Called by the functions above, with the row locked.
TRACK = r"""
CREATE FUNCTION wallet_track_flows(p_account BIGINT, p_counterparty_code TEXT, p_amount BIGINT)
RETURNS VOID LANGUAGE sql AS $$
    UPDATE wallet_accounts a
        SET topup_net = a.topup_net
                + CASE WHEN p_counterparty_code = 'payments' THEN p_amount ELSE 0 END,
            purchases_posted = a.purchases_posted
                - CASE WHEN p_counterparty_code = 'sales' THEN p_amount ELSE 0 END
        WHERE a.id = p_account;
$$;
"""


def _script(sql: str) -> None:
    """Run SQL as is (simple query protocol): ``op.execute`` would read PL/pgSQL's ``:=``
    and ``::`` as bind parameters."""
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    await_(driver.execute(sql))


def upgrade() -> None:
    _script(COLUMNS + TRACK + FUNCTIONS)


def _previous_functions() -> str:
    """Migration 0004's ``wallet_transfer`` and ``wallet_resolve``, as it defined them."""
    path = Path(__file__).with_name("2026-11-22_wallet.py")
    spec = importlib.util.spec_from_file_location("_wallet_0004", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source: str = module.FUNCTIONS
    bodies = [
        re.search(rf"CREATE FUNCTION {name}\(.*?END \$\$;", source, re.DOTALL)
        for name in ("wallet_transfer", "wallet_resolve")
    ]
    assert all(bodies), "migration 0004's ledger functions not found"
    return "\n".join(
        body.group(0).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
        for body in bodies
        if body is not None
    )


def downgrade() -> None:
    _script(
        _previous_functions()
        + "\nDROP FUNCTION IF EXISTS wallet_track_flows(BIGINT, TEXT, BIGINT);"
        + "\nALTER TABLE wallet_accounts DROP COLUMN topup_net, DROP COLUMN purchases_posted;"
    )
