"""Unspent top-up credit: an order-dependent running total on the account row (ADR 0045).

ADR 0033's ``withdrawable = available − max(0, topup_net − purchases_posted)`` is blind to
order: purchases paid with earnings absorbed a *later* top-up (earn 1 000, buy 1 000, top up
1 000 with a stolen card: all 1 000 withdrawable). Two columns now follow the top-up credit
itself, moved by ``wallet_track_flows`` in each posting's transaction, under the row lock the
posting already holds (the pattern of ADR 0036):

- ``topup_unspent``: top-up credit still in the wallet. A top-up (or a won dispute) adds
  to it; a posted purchase consumes it first; a reversal takes it first, but only the part
  the wallet paid itself (the shortfall advanced by receivables does not take reserved
  top-up credit, see below);
- ``topup_spent``: top-up credit that posted purchases consumed, which is what a purchase
  given back by sales restores (never more).

One step of both is ``wallet_topup_step``, shared by ``wallet_track_flows`` and this
migration's backfill (a replay of each wallet's entries in id order: exact, not estimated).
``withdrawable = max(0, available − topup_unspent)`` (0 while in debt, ADR 0042).

Revision ID: 0016_topup_unspent
Revises: 0015_debt
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op
from sqlalchemy.util.concurrency import await_

revision: str = "0016_topup_unspent"
down_revision: str | None = "0015_debt"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = """
ALTER TABLE wallet_accounts
    ADD COLUMN topup_unspent BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN topup_spent BIGINT NOT NULL DEFAULT 0,
    ADD CONSTRAINT ck_wallet_accounts_topup_unspent CHECK (topup_unspent >= 0 AND topup_spent >= 0);
"""

# One entry of ``p_amount`` (signed, on the account) against ``p_code``, given the account's
# (unspent, spent) before it and its topup_net after it: the (unspent, spent) after it.
STEP = r"""
CREATE FUNCTION wallet_topup_step(
    p_unspent BIGINT, p_spent BIGINT, p_topup_net BIGINT, p_code TEXT, p_amount BIGINT,
    OUT unspent BIGINT, OUT spent BIGINT
) LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_used BIGINT;
BEGIN
    unspent := p_unspent;
    spent := p_spent;
    IF p_code = 'payments' THEN
        IF p_amount > 0 THEN      -- a top-up credit, or a won dispute given back
            unspent := unspent + p_amount;
        ELSE                      -- a refund or a lost dispute takes top-up credit first
            unspent := unspent - least(unspent, -p_amount);
        END IF;
    ELSIF p_code = 'sales' THEN
        IF p_amount < 0 THEN      -- a posted purchase spends top-up credit first
            v_used := least(unspent, -p_amount);
            unspent := unspent - v_used;
            spent := spent + v_used;
        ELSE                      -- a purchase given back restores what purchases consumed
            v_used := least(spent, p_amount);
            spent := spent - v_used;
            unspent := unspent + v_used;
        END IF;
    ELSIF p_code = 'receivables' AND p_amount > 0 THEN
        -- The advance that covers a reversal's shortfall (ADR 0042): the reversal that
        -- follows takes ``unspent`` first, so counting the advance in keeps it from taking
        -- top-up credit the wallet did not pay with (reserved by an operation in flight).
        -- The shortfall was spent top-up credit first: no purchase is to restore it.
        unspent := unspent + p_amount;
        spent := spent - least(spent, p_amount);
    END IF;
    -- A repayment (to receivables) moves neither: top-up credit is the last to repay.
    -- Never more than the net top-up credit: what is left of it is unspent or spent.
    unspent := least(unspent, greatest(p_topup_net, 0));
    spent := least(spent, greatest(p_topup_net, 0) - unspent);
END $$;
"""

# 0015's tracking, plus the step above on the same row (locked by the posting already).
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
                + CASE WHEN p_counterparty_code = 'receivables' THEN p_amount ELSE 0 END,
            (topup_unspent, topup_spent) = (
                SELECT s.unspent, s.spent FROM wallet_topup_step(
                    a.topup_unspent, a.topup_spent,
                    a.topup_net
                        + CASE WHEN p_counterparty_code = 'payments' THEN p_amount ELSE 0 END,
                    p_counterparty_code, p_amount) s)
        WHERE a.id = p_account;
$$;
"""

# Exact backfill: each wallet's entries against payments, sales and receivables, replayed in
# id order (a wallet's entries are numbered under its row lock: id order is posting order).
# ALTER TABLE's lock holds every posting off until this migration commits.
BACKFILL = r"""
DO $$
DECLARE
    r RECORD;
    v_account BIGINT := NULL;
    v_net BIGINT := 0;
    v_unspent BIGINT := 0;
    v_spent BIGINT := 0;
BEGIN
    FOR r IN SELECT e.account_id, c.code, e.amount
             FROM wallet_entries e JOIN wallet_accounts c ON c.id = e.counterparty_account_id
             WHERE c.code IN ('payments', 'sales', 'receivables')
               AND e.account_id IN (SELECT p.account_id FROM wallet_entries p
                                    JOIN wallet_accounts pc ON pc.id = p.counterparty_account_id
                                    WHERE pc.code = 'payments')
             ORDER BY e.account_id, e.id
    LOOP
        IF v_account IS DISTINCT FROM r.account_id THEN
            IF v_account IS NOT NULL THEN
                UPDATE wallet_accounts SET topup_unspent = v_unspent, topup_spent = v_spent
                    WHERE id = v_account;
            END IF;
            v_account := r.account_id;
            v_net := 0;
            v_unspent := 0;
            v_spent := 0;
        END IF;
        IF r.code = 'payments' THEN
            v_net := v_net + r.amount;
        END IF;
        SELECT s.unspent, s.spent INTO v_unspent, v_spent
            FROM wallet_topup_step(v_unspent, v_spent, v_net, r.code, r.amount) s;
    END LOOP;
    IF v_account IS NOT NULL THEN
        UPDATE wallet_accounts SET topup_unspent = v_unspent, topup_spent = v_spent
            WHERE id = v_account;
    END IF;
END $$;
"""


def _script(sql: str) -> None:
    """Run SQL as is (simple query protocol): ``op.execute`` would read PL/pgSQL's ``:=``
    and ``::`` as bind parameters."""
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    await_(driver.execute(sql))


def upgrade() -> None:
    _script(COLUMNS + STEP + TRACK + BACKFILL)


def _previous_track() -> str:
    """Migration 0015's ``wallet_track_flows``, as it defined it."""
    path = Path(__file__).with_name("2026-12-07_debt.py")
    spec = importlib.util.spec_from_file_location("_wallet_0015", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    track: str = module.TRACK
    return track


def downgrade() -> None:
    _script(
        _previous_track()
        + "DROP FUNCTION wallet_topup_step(BIGINT, BIGINT, BIGINT, TEXT, BIGINT);\n"
        "ALTER TABLE wallet_accounts DROP CONSTRAINT ck_wallet_accounts_topup_unspent, "
        "DROP COLUMN topup_unspent, DROP COLUMN topup_spent;\n"
    )
