"""Pending credits: a contended credit is posted after the commit, not waited for (ADR 0065).

A unit of work that credits a hot wallet holds that wallet's row lock from the transfer call
to the end of its COMMIT (WAL flush included), and every other unit of work crediting it
queues behind (ADR 0063, finding 4). ``wallet_transfer_deferring`` is ``wallet_transfer``
(posted, not two-phase) with one difference: the debit leg locks and applies as always (the
funds and debt checks on the locked row), then the credit leg tries the credited row's lock
*without waiting*. Free (or held by this transaction already): the credit applies at once,
exactly as ``wallet_transfer`` would. Held by another transaction: the credit is written as
a row of ``wallet_pending_credits`` in the caller's transaction and the function returns a
NULL ``credit_balance``; the credited account's balance does not move yet. The two rows are
still taken in id order (the credit's, when skipped, as a KEY SHARE lock: what the foreign
keys of the transfer take on it anyway, waited for only behind a FOR UPDATE holder), so
the ledger's one lock order holds and no cycle can form.

``wallet_post_credits(account, limit)`` posts an account's pending credits: it locks the
account once, and for each pending row in id order writes the credit entry with its exact
balance before/after, keeps the running totals (``wallet_track_flows``) and deletes the row,
all in its own transaction: a row is posted exactly once (the delete commits with the entry)
and a failure posts nothing. ``wallet_post_all_credits(limit)`` does it for every account
with pending rows (the sweeper: what a crash left behind).

Locks: both functions take ``FOR NO KEY UPDATE``, which does not conflict with the ``KEY
SHARE`` locks that the foreign keys of an in-flight transfer take on its accounts (the
transfers of deferred credits hold one on the hot row until they commit); ``FOR UPDATE``
would make the poster wait for all of them. A balance ``UPDATE`` takes the same lock mode.

Revision ID: 0020_pending_credits
Revises: 0019_system_stripes
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy.util.concurrency import await_

revision: str = "0020_pending_credits"
down_revision: str | None = "0019_system_stripes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = """
CREATE TABLE wallet_pending_credits (
    id                      BIGINT GENERATED ALWAYS AS IDENTITY,
    account_id              BIGINT      NOT NULL,
    transfer_id             BIGINT      NOT NULL,
    counterparty_account_id BIGINT      NOT NULL,
    amount                  BIGINT      NOT NULL,
    currency                TEXT        NOT NULL,
    kind                    TEXT        NOT NULL,
    reference               TEXT,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_wallet_pending_credits PRIMARY KEY (id),
    CONSTRAINT uq_wallet_pending_credits_transfer_id UNIQUE (transfer_id),
    CONSTRAINT fk_wallet_pending_credits_account_id_wallet_accounts
        FOREIGN KEY (account_id) REFERENCES wallet_accounts (id),
    CONSTRAINT fk_wallet_pending_credits_transfer_id_wallet_transfers
        FOREIGN KEY (transfer_id) REFERENCES wallet_transfers (id),
    CONSTRAINT ck_wallet_pending_credits_amount CHECK (amount > 0)
);
CREATE INDEX ix_wallet_pending_credits_account ON wallet_pending_credits (account_id, id);
"""

FUNCTIONS = r"""
CREATE FUNCTION wallet_transfer_deferring(
    p_key TEXT, p_debit BIGINT, p_credit BIGINT, p_amount BIGINT, p_currency TEXT,
    p_kind TEXT, p_reference TEXT
) RETURNS TABLE (transfer_id BIGINT, created BOOLEAN, debit_balance BIGINT, credit_balance BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_id BIGINT;
    v_old wallet_transfers%ROWTYPE;
    v_debit_code TEXT;
    v_credit_code TEXT;
    v_debit_debt BIGINT;
    v_debit_free BIGINT;
    v_deferred BOOLEAN := false;
    v_debit_after BIGINT;
    v_credit_after BIGINT;
BEGIN
    IF p_debit = p_credit THEN
        RAISE EXCEPTION 'a transfer needs two different accounts' USING ERRCODE = 'WL422';
    END IF;
    IF p_amount <= 0 THEN
        RAISE EXCEPTION 'amount must be positive' USING ERRCODE = 'WL422';
    END IF;
    -- Both rows in id order, as every ledger function takes them (no lock cycle). The debit
    -- waits for its row, as in wallet_transfer: its funds are checked there. The credit
    -- never waits for an exclusive lock: held by another transaction, the credit goes
    -- pending, and only a KEY SHARE lock is taken on its row (what the transfer's foreign
    -- key takes anyway; it waits only for a FOR UPDATE holder, and in id order).
    FOR v_step IN 1 .. 2 LOOP
        IF (v_step = 1) = (p_debit < p_credit) THEN
            SELECT a.code, a.debt, a.balance - a.pending_out
                INTO v_debit_code, v_debit_debt, v_debit_free
                FROM wallet_accounts a WHERE a.id = p_debit AND a.currency = p_currency
                FOR NO KEY UPDATE;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'accounts % and % do not both exist in %', p_debit, p_credit,
                    p_currency USING ERRCODE = 'WL404';
            END IF;
        ELSE
            -- A row this transaction holds already is not skipped.
            SELECT a.code INTO v_credit_code FROM wallet_accounts a
                WHERE a.id = p_credit AND a.currency = p_currency
                FOR NO KEY UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                SELECT a.code INTO v_credit_code FROM wallet_accounts a
                    WHERE a.id = p_credit AND a.currency = p_currency FOR KEY SHARE;
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'accounts % and % do not both exist in %', p_debit,
                        p_credit, p_currency USING ERRCODE = 'WL404';
                END IF;
                v_deferred := true;
            END IF;
        END IF;
    END LOOP;
    INSERT INTO wallet_transfers AS t (idempotency_key, debit_account_id, credit_account_id,
                                       amount, currency, phase, kind, reference)
        VALUES (p_key, p_debit, p_credit, p_amount, p_currency, 'single', p_kind, p_reference)
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING t.id INTO v_id;
    IF v_id IS NULL THEN
        SELECT * INTO v_old FROM wallet_transfers t WHERE t.idempotency_key = p_key;
        IF (v_old.debit_account_id, v_old.credit_account_id, v_old.amount, v_old.currency,
            v_old.phase) IS DISTINCT FROM (p_debit, p_credit, p_amount, p_currency, 'single') THEN
            RAISE EXCEPTION 'idempotency key % was used for a different transfer', p_key
                USING ERRCODE = 'WL409';
        END IF;
        RETURN QUERY SELECT v_old.id, false,
            (SELECT a.balance FROM wallet_accounts a WHERE a.id = p_debit),
            CASE WHEN EXISTS (SELECT 1 FROM wallet_pending_credits p
                              WHERE p.transfer_id = v_old.id) THEN NULL
                 ELSE (SELECT a.balance FROM wallet_accounts a WHERE a.id = p_credit) END;
        RETURN;
    END IF;
    IF v_debit_debt > 0 AND v_credit_code NOT IN ('payments', 'receivables')
       AND v_debit_free - p_amount < v_debit_debt THEN
        RAISE EXCEPTION 'account % owes % and cannot spend % of its %', p_debit, v_debit_debt,
            p_amount, v_debit_free USING ERRCODE = 'WL402';
    END IF;
    UPDATE wallet_accounts a SET balance = a.balance - p_amount, updated_at = now()
        WHERE a.id = p_debit RETURNING a.balance INTO v_debit_after;
    IF v_deferred THEN
        INSERT INTO wallet_entries (account_id, transfer_id, counterparty_account_id, amount,
                                    balance_before, balance_after, kind, reference)
        VALUES (p_debit, v_id, p_credit, -p_amount, v_debit_after + p_amount, v_debit_after,
                p_kind, p_reference);
        INSERT INTO wallet_pending_credits (account_id, transfer_id, counterparty_account_id,
                                            amount, currency, kind, reference)
        VALUES (p_credit, v_id, p_debit, p_amount, p_currency, p_kind, p_reference);
    ELSE
        UPDATE wallet_accounts a SET balance = a.balance + p_amount, updated_at = now()
            WHERE a.id = p_credit RETURNING a.balance INTO v_credit_after;
        INSERT INTO wallet_entries (account_id, transfer_id, counterparty_account_id, amount,
                                    balance_before, balance_after, kind, reference)
        VALUES (p_debit, v_id, p_credit, -p_amount, v_debit_after + p_amount, v_debit_after,
                p_kind, p_reference),
               (p_credit, v_id, p_debit, p_amount, v_credit_after - p_amount, v_credit_after,
                p_kind, p_reference);
        IF v_debit_code IN ('payments', 'sales', 'receivables') THEN
            PERFORM wallet_track_flows(p_credit, v_debit_code, p_amount);
        END IF;
    END IF;
    IF v_credit_code IN ('payments', 'sales', 'receivables') THEN
        PERFORM wallet_track_flows(p_debit, v_credit_code, -p_amount);
    END IF;
    RETURN QUERY SELECT v_id, true, v_debit_after, v_credit_after;
END $$;

CREATE FUNCTION wallet_post_credits(p_account BIGINT, p_limit INTEGER)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    v_balance BIGINT;
    v_posted INTEGER := 0;
    r RECORD;
BEGIN
    SELECT a.balance INTO v_balance FROM wallet_accounts a WHERE a.id = p_account
        FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- Under the account's lock: only this transaction posts its rows now (another poster
    -- waits above, then finds them gone). Id order is the order the credits committed in
    -- closely enough; each entry's before/after is exact in the order written.
    FOR r IN SELECT p.id, p.transfer_id, p.counterparty_account_id, p.amount, p.kind,
                    p.reference, c.code
             FROM wallet_pending_credits p
             JOIN wallet_accounts c ON c.id = p.counterparty_account_id
             WHERE p.account_id = p_account ORDER BY p.id LIMIT p_limit
    LOOP
        INSERT INTO wallet_entries (account_id, transfer_id, counterparty_account_id, amount,
                                    balance_before, balance_after, kind, reference)
        VALUES (p_account, r.transfer_id, r.counterparty_account_id, r.amount, v_balance,
                v_balance + r.amount, r.kind, r.reference);
        v_balance := v_balance + r.amount;
        IF r.code IN ('payments', 'sales', 'receivables') THEN
            PERFORM wallet_track_flows(p_account, r.code, r.amount);
        END IF;
        DELETE FROM wallet_pending_credits p WHERE p.id = r.id;
        v_posted := v_posted + 1;
    END LOOP;
    IF v_posted > 0 THEN
        UPDATE wallet_accounts a SET balance = v_balance, updated_at = now()
            WHERE a.id = p_account;
    END IF;
    RETURN v_posted;
END $$;

CREATE FUNCTION wallet_post_all_credits(p_limit INTEGER)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    v_account BIGINT;
    v_posted INTEGER := 0;
BEGIN
    FOR v_account IN SELECT DISTINCT p.account_id FROM wallet_pending_credits p ORDER BY 1 LOOP
        v_posted := v_posted + wallet_post_credits(v_account, p_limit);
    END LOOP;
    RETURN v_posted;
END $$;
"""


def _script(sql: str) -> None:
    """Run SQL as is (simple query protocol): ``op.execute`` would read PL/pgSQL's ``:=``
    and ``::`` as bind parameters."""
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    await_(driver.execute(sql))


def upgrade() -> None:
    _script(TABLE + FUNCTIONS)


def downgrade() -> None:
    # Pending credits are money owed to their accounts: posted first, never dropped.
    _script(
        "SELECT wallet_post_all_credits(2147483647);\n"
        "DROP FUNCTION wallet_post_all_credits(INTEGER);\n"
        "DROP FUNCTION wallet_post_credits(BIGINT, INTEGER);\n"
        "DROP FUNCTION wallet_transfer_deferring(TEXT, BIGINT, BIGINT, BIGINT, TEXT, TEXT, TEXT);\n"
        "DROP TABLE wallet_pending_credits;\n"
    )
