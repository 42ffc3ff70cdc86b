"""Debt: a reversal always posts; what the wallet cannot cover becomes a receivable (ADR 0042).

A refund or a lost dispute of a top-up whose credit the owner already spent was refused by
the guarded wallet and dead-lettered: the provider had the money back, the platform had lost
it, and nothing recovered it. Now:

- a ``receivables`` system account per currency (unguarded: its balance is minus what owners
  owe the platform) advances the shortfall to the wallet, so the reversal posts in full;
- ``wallet_accounts.debt`` is the running total of an account's entries against
  ``receivables`` (advances in, repayments out), kept by ``wallet_track_flows`` like the
  top-up totals of migration 0014, never negative (``ck_wallet_accounts_debt``);
- ``wallet_transfer`` refuses (``WL402``) a debit of an account in debt that would leave it
  less free balance than its debt, except towards ``payments`` (the reversal) and
  ``receivables`` (the repayment): no withdrawal, no purchase beyond available − debt;
- ``wallet_collect(wallet, key, reference)`` repays ``least(debt, free balance)`` under
  ``key`` (a no-op without debt, and once per key), called after every credit that could
  pay a debt (top-ups, won disputes, earnings, released reservations);
- ``payment_topups.status`` gains ``dispute_won``: the final status of a top-up whose
  dispute the merchant won.

Revision ID: 0015_debt
Revises: 0014_wallet_topup_totals
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op
from sqlalchemy.util.concurrency import await_

revision: str = "0015_debt"
down_revision: str | None = "0014_wallet_topup_totals"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = """
ALTER TABLE wallet_accounts
    ADD COLUMN debt BIGINT NOT NULL DEFAULT 0,
    ADD CONSTRAINT ck_wallet_accounts_debt CHECK (debt >= 0);
-- Empty on the first upgrade (receivables is new); exact after a downgrade and upgrade
-- again (ALTER TABLE's lock holds every posting off until this migration commits).
UPDATE wallet_accounts a SET debt = f.owed
    FROM (SELECT e.account_id, sum(e.amount) AS owed
          FROM wallet_entries e JOIN wallet_accounts c ON c.id = e.counterparty_account_id
          WHERE c.code = 'receivables' GROUP BY e.account_id) f
    WHERE f.account_id = a.id;
ALTER TABLE payment_topups DROP CONSTRAINT ck_payment_topups_status;
ALTER TABLE payment_topups ADD CONSTRAINT ck_payment_topups_status CHECK (status IN ('pending',
    'requires_action', 'processing', 'succeeded', 'failed', 'refunded', 'disputed',
    'dispute_won'));
"""

# One posted entry of ``p_amount`` (signed, on ``p_account``) against a payments, sales or
# receivables account moves the matching total. Called by the functions below, row locked.
TRACK = r"""
CREATE OR REPLACE FUNCTION wallet_track_flows(
    p_account BIGINT, p_counterparty_code TEXT, p_amount BIGINT
) RETURNS VOID LANGUAGE sql AS $$
    UPDATE wallet_accounts a
        SET topup_net = a.topup_net
                + CASE WHEN p_counterparty_code = 'payments' THEN p_amount ELSE 0 END,
            purchases_posted = a.purchases_posted
                - CASE WHEN p_counterparty_code = 'sales' THEN p_amount ELSE 0 END,
            debt = a.debt
                + CASE WHEN p_counterparty_code = 'receivables' THEN p_amount ELSE 0 END
        WHERE a.id = p_account;
$$;
"""

# Repay what ``p_wallet`` owes from its free balance, once per key. The wallet's row is
# locked first (a no-op when the caller's credit holds it already), receivables last.
COLLECT = r"""
CREATE FUNCTION wallet_collect(p_wallet BIGINT, p_key TEXT, p_reference TEXT)
RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    v_debt BIGINT;
    v_free BIGINT;
    v_currency TEXT;
    v_receivables BIGINT;
    v_amount BIGINT;
BEGIN
    SELECT a.debt, a.balance - a.pending_out, a.currency INTO v_debt, v_free, v_currency
        FROM wallet_accounts a WHERE a.id = p_wallet FOR UPDATE;
    IF NOT FOUND OR v_debt <= 0 OR v_free <= 0 THEN
        RETURN 0;
    END IF;
    IF EXISTS (SELECT 1 FROM wallet_transfers t WHERE t.idempotency_key = p_key) THEN
        RETURN 0;
    END IF;
    SELECT a.id INTO v_receivables FROM wallet_accounts a
        WHERE a.code = 'receivables' AND a.owner_id IS NULL AND a.currency = v_currency;
    v_amount := least(v_debt, v_free);
    PERFORM wallet_transfer(p_key, p_wallet, v_receivables, v_amount, v_currency,
                            'debt_repayment', p_reference, false);
    RETURN v_amount;
END $$;
"""

# Migration 0014's ledger functions with the debt: the lock statement also reads the debit
# side's debt and free balance; the spending rule runs only when that debt is positive.
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
    v_debit_debt BIGINT;
    v_debit_free BIGINT;
    v_debit_after BIGINT;
    v_credit_after BIGINT;
BEGIN
    IF p_debit = p_credit THEN
        RAISE EXCEPTION 'a transfer needs two different accounts' USING ERRCODE = 'WL422';
    END IF;
    SELECT count(*), max(l.code) FILTER (WHERE l.id = p_debit),
           max(l.code) FILTER (WHERE l.id = p_credit),
           max(l.debt) FILTER (WHERE l.id = p_debit),
           max(l.balance - l.pending_out) FILTER (WHERE l.id = p_debit)
        INTO v_locked, v_debit_code, v_credit_code, v_debit_debt, v_debit_free
        FROM (SELECT a.id, a.code, a.debt, a.balance, a.pending_out FROM wallet_accounts a
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
    -- An account in debt spends only what exceeds its debt; only the reversal that made
    -- the debt (to payments) and its repayment (to receivables) may take the rest.
    IF v_debit_debt > 0 AND v_credit_code NOT IN ('payments', 'receivables')
       AND v_debit_free - p_amount < v_debit_debt THEN
        RAISE EXCEPTION 'account % owes % and cannot spend % of its %', p_debit, v_debit_debt,
            p_amount, v_debit_free USING ERRCODE = 'WL402';
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
        IF v_credit_code IN ('payments', 'sales', 'receivables') THEN
            PERFORM wallet_track_flows(p_debit, v_credit_code, -p_amount);
        END IF;
        IF v_debit_code IN ('payments', 'sales', 'receivables') THEN
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
        IF v_credit_code IN ('payments', 'sales', 'receivables') THEN
            PERFORM wallet_track_flows(v_p.debit_account_id, v_credit_code, -v_p.amount);
        END IF;
        IF v_debit_code IN ('payments', 'sales', 'receivables') THEN
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


def _script(sql: str) -> None:
    """Run SQL as is (simple query protocol): ``op.execute`` would read PL/pgSQL's ``:=``
    and ``::`` as bind parameters."""
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    await_(driver.execute(sql))


def upgrade() -> None:
    _script(COLUMNS + TRACK + FUNCTIONS + COLLECT)


def _previous() -> tuple[str, str]:
    """Migration 0014's (track, functions), as it defined them."""
    path = Path(__file__).with_name("2026-12-07_wallet_topup_totals.py")
    spec = importlib.util.spec_from_file_location("_wallet_0014", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    track: str = module.TRACK
    functions: str = module.FUNCTIONS
    return track.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1), functions


def downgrade() -> None:
    track, functions = _previous()
    _script(
        "DROP FUNCTION IF EXISTS wallet_collect(BIGINT, TEXT, TEXT);\n"
        + track
        + functions
        + "ALTER TABLE wallet_accounts DROP CONSTRAINT ck_wallet_accounts_debt, "
        "DROP COLUMN debt;\n"
        "UPDATE payment_topups SET status = 'disputed' WHERE status = 'dispute_won';\n"
        "ALTER TABLE payment_topups DROP CONSTRAINT ck_payment_topups_status;\n"
        "ALTER TABLE payment_topups ADD CONSTRAINT ck_payment_topups_status CHECK (status IN "
        "('pending', 'requires_action', 'processing', 'succeeded', 'failed', 'refunded', "
        "'disputed'));\n"
    )
