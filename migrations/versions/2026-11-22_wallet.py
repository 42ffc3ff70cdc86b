"""Wallet: a double-entry ledger (accounts, immutable transfers, partitioned entries),
partner terms, revenue events, earnings, withdrawals, the stats view, HTTP idempotency keys.

The money core lives in two PL/pgSQL functions (``wallet_transfer``, ``wallet_resolve``) so
one transfer is one round trip: lock both accounts in id order, claim the idempotency key,
move the balances, write the two entries with balance before/after (ADR 0010).

Revision ID: 0004_wallet
Revises: 0003_identity
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy.util.concurrency import await_

revision: str = "0004_wallet"
down_revision: str | None = "0003_identity"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = """
-- Generic (kit.web.idempotency): one row per (scope, key); written in the same transaction
-- as the effect it guards, so a crash leaves either both or neither.
CREATE TABLE idempotency_keys (
    scope        TEXT        NOT NULL,
    key          TEXT        NOT NULL,
    fingerprint  TEXT        NOT NULL,
    status_code  INTEGER,
    body         BYTEA,
    content_type TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_idempotency_keys PRIMARY KEY (scope, key)
);
CREATE INDEX ix_idempotency_keys_created_at ON idempotency_keys (created_at);

CREATE TABLE wallet_accounts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY,
    owner_id    UUID,
    code        TEXT        NOT NULL,
    currency    TEXT        NOT NULL,
    balance     BIGINT      NOT NULL DEFAULT 0,
    pending_out BIGINT      NOT NULL DEFAULT 0,
    pending_in  BIGINT      NOT NULL DEFAULT 0,
    guarded     BOOLEAN     NOT NULL DEFAULT true,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_wallet_accounts PRIMARY KEY (id),
    -- The money rule the database enforces itself: a guarded account never shows less than
    -- zero available (posted balance minus reservations), whatever the Python above does.
    CONSTRAINT ck_wallet_accounts_non_negative CHECK (NOT guarded OR balance - pending_out >= 0),
    CONSTRAINT ck_wallet_accounts_pending_out CHECK (pending_out >= 0),
    CONSTRAINT ck_wallet_accounts_pending_in CHECK (pending_in >= 0),
    CONSTRAINT ck_wallet_accounts_owner CHECK ((code = 'wallet') = (owner_id IS NOT NULL)),
    CONSTRAINT ck_wallet_accounts_currency CHECK (currency ~ '^[A-Z]{3}$')
);
CREATE UNIQUE INDEX uq_wallet_accounts_owner ON wallet_accounts (owner_id, currency)
    WHERE owner_id IS NOT NULL;
CREATE UNIQUE INDEX uq_wallet_accounts_system ON wallet_accounts (code, currency)
    WHERE owner_id IS NULL;

-- The journal. Not partitioned: idempotency keys and "a pending transfer is resolved at most
-- once" must be unique across all time, which a partitioned unique index cannot promise.
CREATE TABLE wallet_transfers (
    id                BIGINT GENERATED ALWAYS AS IDENTITY,
    idempotency_key   TEXT        NOT NULL,
    debit_account_id  BIGINT      NOT NULL,
    credit_account_id BIGINT      NOT NULL,
    amount            BIGINT      NOT NULL,
    currency          TEXT        NOT NULL,
    phase             TEXT        NOT NULL,
    pending_id        BIGINT,
    kind              TEXT        NOT NULL,
    reference         TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_wallet_transfers PRIMARY KEY (id),
    CONSTRAINT uq_wallet_transfers_idempotency_key UNIQUE (idempotency_key),
    CONSTRAINT fk_wallet_transfers_debit_account_id_wallet_accounts
        FOREIGN KEY (debit_account_id) REFERENCES wallet_accounts (id),
    CONSTRAINT fk_wallet_transfers_credit_account_id_wallet_accounts
        FOREIGN KEY (credit_account_id) REFERENCES wallet_accounts (id),
    CONSTRAINT fk_wallet_transfers_pending_id_wallet_transfers
        FOREIGN KEY (pending_id) REFERENCES wallet_transfers (id),
    CONSTRAINT ck_wallet_transfers_amount CHECK (amount > 0),
    CONSTRAINT ck_wallet_transfers_two_accounts CHECK (debit_account_id <> credit_account_id),
    CONSTRAINT ck_wallet_transfers_phase CHECK (phase IN ('single', 'pending', 'post', 'void')),
    CONSTRAINT ck_wallet_transfers_resolves
        CHECK ((phase IN ('post', 'void')) = (pending_id IS NOT NULL))
);
-- Two-phase: at most one post-or-void per pending transfer, guarded by the database.
CREATE UNIQUE INDEX uq_wallet_transfers_pending_id ON wallet_transfers (pending_id)
    WHERE pending_id IS NOT NULL;

-- History: one row per leg of every posted movement, with the balance before and after.
CREATE TABLE wallet_entries (
    id                      BIGINT GENERATED ALWAYS AS IDENTITY,
    account_id              BIGINT      NOT NULL,
    transfer_id             BIGINT      NOT NULL,
    counterparty_account_id BIGINT      NOT NULL,
    amount                  BIGINT      NOT NULL,
    balance_before          BIGINT      NOT NULL,
    balance_after           BIGINT      NOT NULL,
    kind                    TEXT        NOT NULL,
    reference               TEXT,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_wallet_entries PRIMARY KEY (id, created_at),
    CONSTRAINT ck_wallet_entries_arithmetic CHECK (balance_after = balance_before + amount),
    CONSTRAINT ck_wallet_entries_amount CHECK (amount <> 0)
) PARTITION BY RANGE (created_at);
CREATE INDEX ix_wallet_entries_account ON wallet_entries (account_id, created_at DESC, id DESC);

-- The commercial terms of a partner (seed 001): its share of each event's profit and the
-- commission paid on that shown profit, both in basis points (1 % = 100 bp).
CREATE TABLE wallet_partners (
    owner_id       UUID        NOT NULL,
    share_bps      INTEGER     NOT NULL,
    commission_bps INTEGER     NOT NULL,
    active         BOOLEAN     NOT NULL DEFAULT true,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_wallet_partners PRIMARY KEY (owner_id),
    CONSTRAINT ck_wallet_partners_share_bps CHECK (share_bps BETWEEN 0 AND 10000),
    CONSTRAINT ck_wallet_partners_commission_bps CHECK (commission_bps BETWEEN 0 AND 10000)
);
CREATE INDEX ix_wallet_partners_active ON wallet_partners (owner_id) WHERE active;

CREATE TABLE wallet_revenue_events (
    id          TEXT        NOT NULL,
    kind        TEXT        NOT NULL,
    profit      BIGINT      NOT NULL,
    currency    TEXT        NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_wallet_revenue_events PRIMARY KEY (id)
);

CREATE TABLE wallet_earnings (
    id           BIGINT GENERATED ALWAYS AS IDENTITY,
    event_id     TEXT        NOT NULL,
    owner_id     UUID        NOT NULL,
    transfer_id  BIGINT      NOT NULL,
    shown_profit BIGINT      NOT NULL,
    amount       BIGINT      NOT NULL,
    currency     TEXT        NOT NULL,
    share_bps    INTEGER     NOT NULL,
    commission_bps INTEGER   NOT NULL,
    event_kind   TEXT        NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_wallet_earnings PRIMARY KEY (id, created_at),
    CONSTRAINT ck_wallet_earnings_amount CHECK (amount > 0)
) PARTITION BY RANGE (created_at);
CREATE INDEX ix_wallet_earnings_owner ON wallet_earnings (owner_id, created_at DESC, id DESC);

CREATE TABLE wallet_withdrawals (
    id                     UUID        NOT NULL DEFAULT gen_random_uuid(),
    owner_id               UUID        NOT NULL,
    account_id             BIGINT      NOT NULL,
    amount                 BIGINT      NOT NULL,
    currency               TEXT        NOT NULL,
    status                 TEXT        NOT NULL DEFAULT 'pending',
    transfer_id            BIGINT      NOT NULL,
    resolution_transfer_id BIGINT,
    decided_by             UUID,
    decided_at             TIMESTAMPTZ,
    reason                 TEXT,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pk_wallet_withdrawals PRIMARY KEY (id),
    CONSTRAINT fk_wallet_withdrawals_account_id_wallet_accounts
        FOREIGN KEY (account_id) REFERENCES wallet_accounts (id),
    CONSTRAINT fk_wallet_withdrawals_transfer_id_wallet_transfers
        FOREIGN KEY (transfer_id) REFERENCES wallet_transfers (id),
    CONSTRAINT ck_wallet_withdrawals_amount CHECK (amount > 0),
    CONSTRAINT ck_wallet_withdrawals_status CHECK (status IN ('pending', 'approved', 'rejected')),
    CONSTRAINT ck_wallet_withdrawals_decided
        CHECK ((status = 'pending') = (resolution_transfer_id IS NULL))
);
CREATE INDEX ix_wallet_withdrawals_owner ON wallet_withdrawals (owner_id, created_at DESC, id DESC);
CREATE INDEX ix_wallet_withdrawals_pending ON wallet_withdrawals (created_at) WHERE status = 'pending';
"""

FUNCTIONS = r"""
-- Transfers and entries are append-only: corrections are new transfers (TigerBeetle).
CREATE FUNCTION wallet_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'WL405';
END $$;
CREATE TRIGGER wallet_transfers_append_only BEFORE UPDATE OR DELETE ON wallet_transfers
    FOR EACH ROW EXECUTE FUNCTION wallet_forbid_change();
CREATE TRIGGER wallet_entries_append_only BEFORE UPDATE OR DELETE ON wallet_entries
    FOR EACH ROW EXECUTE FUNCTION wallet_forbid_change();

-- Partition upkeep: this month and the next p_months for every monthly-partitioned table.
-- Called by the migration, at start-up and by the periodic upkeep job; idempotent.
CREATE FUNCTION wallet_ensure_partitions(p_months INTEGER DEFAULT 3) RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    v_table TEXT;
    v_start DATE;
    v_name TEXT;
    v_created INTEGER := 0;
BEGIN
    FOREACH v_table IN ARRAY ARRAY['wallet_entries', 'wallet_earnings'] LOOP
        FOR i IN 0..p_months LOOP
            v_start := (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i))::date;
            v_name := v_table || '_' || to_char(v_start, 'YYYY_MM');
            IF to_regclass(v_name) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                    v_name, v_table, v_start::timestamp AT TIME ZONE 'UTC',
                    (v_start + interval '1 month')::timestamp AT TIME ZONE 'UTC');
                v_created := v_created + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN v_created;
END $$;

-- One transfer, one round trip. Locks both accounts in id order (so two transfers over the
-- same pair, whatever their direction, queue instead of deadlocking), claims the idempotency
-- key, then moves the balances and writes the entries. A replayed key returns the first
-- transfer (created = false); a key reused with different fields raises WL409.
CREATE FUNCTION wallet_transfer(
    p_key TEXT, p_debit BIGINT, p_credit BIGINT, p_amount BIGINT, p_currency TEXT,
    p_kind TEXT, p_reference TEXT, p_pending BOOLEAN
) RETURNS TABLE (transfer_id BIGINT, created BOOLEAN, debit_balance BIGINT, credit_balance BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_id BIGINT;
    v_phase TEXT := CASE WHEN p_pending THEN 'pending' ELSE 'single' END;
    v_old wallet_transfers%ROWTYPE;
    v_locked INTEGER;
    v_debit_after BIGINT;
    v_credit_after BIGINT;
BEGIN
    IF p_debit = p_credit THEN
        RAISE EXCEPTION 'a transfer needs two different accounts' USING ERRCODE = 'WL422';
    END IF;
    PERFORM 1 FROM wallet_accounts
        WHERE id IN (p_debit, p_credit) AND currency = p_currency
        ORDER BY id FOR UPDATE;
    GET DIAGNOSTICS v_locked = ROW_COUNT;
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
    END IF;
    RETURN QUERY SELECT v_id, true, v_debit_after, v_credit_after;
END $$;

-- Second phase of a pending transfer: post (the reserved amount moves) or void (it is
-- released). At most once per pending transfer (unique index on pending_id); a replay with
-- the same key returns the first resolution; another key raises WL410 (already resolved).
CREATE FUNCTION wallet_resolve(p_key TEXT, p_pending_id BIGINT, p_post BOOLEAN, p_kind TEXT)
RETURNS TABLE (transfer_id BIGINT, created BOOLEAN, debit_balance BIGINT, credit_balance BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_p wallet_transfers%ROWTYPE;
    v_id BIGINT;
    v_phase TEXT := CASE WHEN p_post THEN 'post' ELSE 'void' END;
    v_old wallet_transfers%ROWTYPE;
    v_debit_after BIGINT;
    v_credit_after BIGINT;
BEGIN
    SELECT * INTO v_p FROM wallet_transfers t WHERE t.id = p_pending_id AND t.phase = 'pending';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no pending transfer %', p_pending_id USING ERRCODE = 'WL404';
    END IF;
    PERFORM 1 FROM wallet_accounts
        WHERE id IN (v_p.debit_account_id, v_p.credit_account_id) ORDER BY id FOR UPDATE;
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
    ELSE
        UPDATE wallet_accounts a SET pending_out = a.pending_out - v_p.amount, updated_at = now()
            WHERE a.id = v_p.debit_account_id RETURNING a.balance INTO v_debit_after;
        UPDATE wallet_accounts a SET pending_in = a.pending_in - v_p.amount, updated_at = now()
            WHERE a.id = v_p.credit_account_id RETURNING a.balance INTO v_credit_after;
    END IF;
    RETURN QUERY SELECT v_id, true, v_debit_after, v_credit_after;
END $$;
"""

VIEWS = """
-- Dashboard stats (seed 001): the heavy aggregate over all earnings, refreshed CONCURRENTLY
-- (needs the unique index) every 5 min. It covers earnings older than one minute at refresh
-- time (`covered_until`); reads add the few rows since, so a figure is never 5 min behind,
-- and a transaction that committed late (up to a minute) is not missed by either side.
CREATE MATERIALIZED VIEW wallet_stats AS
WITH bounds AS (SELECT now() AS refreshed_at, now() - interval '1 minute' AS covered_until)
SELECT a.owner_id,
       a.currency,
       COALESCE(e.earnings_count, 0)::BIGINT AS earnings_count,
       COALESCE(e.earnings_total, 0)::BIGINT AS earnings_total,
       COALESCE(e.shown_profit_total, 0)::BIGINT AS shown_profit_total,
       e.last_earning_at,
       bounds.refreshed_at,
       bounds.covered_until
FROM wallet_accounts a
CROSS JOIN bounds
LEFT JOIN (
    SELECT owner_id, currency, count(*) AS earnings_count, sum(amount) AS earnings_total,
           sum(shown_profit) AS shown_profit_total, max(created_at) AS last_earning_at
    FROM wallet_earnings
    WHERE created_at < (SELECT covered_until FROM bounds)
    GROUP BY owner_id, currency
) e ON e.owner_id = a.owner_id AND e.currency = a.currency
WHERE a.owner_id IS NOT NULL;
CREATE UNIQUE INDEX uq_wallet_stats_owner ON wallet_stats (owner_id, currency);
"""

SECURITY = """
-- Defence in depth (seed 001 used RLS): when the application sets `surge.owner_id` for a
-- partner's read session, PostgreSQL itself hides every other partner's rows. Without the
-- setting (admins, jobs, the ledger itself) the policy lets everything through. FORCE makes
-- it bind the tables' owner too, i.e. Surge's own connections.
ALTER TABLE wallet_withdrawals ENABLE ROW LEVEL SECURITY;
ALTER TABLE wallet_withdrawals FORCE ROW LEVEL SECURITY;
CREATE POLICY wallet_withdrawals_owner ON wallet_withdrawals
    USING (coalesce(current_setting('surge.owner_id', true), '') = ''
           OR owner_id = current_setting('surge.owner_id', true)::uuid);
ALTER TABLE wallet_earnings ENABLE ROW LEVEL SECURITY;
ALTER TABLE wallet_earnings FORCE ROW LEVEL SECURITY;
CREATE POLICY wallet_earnings_owner ON wallet_earnings
    USING (coalesce(current_setting('surge.owner_id', true), '') = ''
           OR owner_id = current_setting('surge.owner_id', true)::uuid);
"""


def _script(sql: str) -> None:
    """Run a multi-statement SQL script as is (simple query protocol, in the migration's
    transaction): ``op.execute`` would prepare it, which allows one statement only and reads
    every ``:name`` (PL/pgSQL's ``:=``, ``::type``) as a bind parameter."""
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    await_(driver.execute(sql))


def upgrade() -> None:
    _script(TABLES)
    # The DEFAULT partitions catch rows if upkeep ever falls behind (a write never fails
    # for want of a partition); upkeep keeps them empty by creating months ahead.
    _script(
        "CREATE TABLE wallet_entries_default PARTITION OF wallet_entries DEFAULT;"
        "CREATE TABLE wallet_earnings_default PARTITION OF wallet_earnings DEFAULT;"
    )
    _script(FUNCTIONS)
    _script("SELECT wallet_ensure_partitions(3)")
    _script(VIEWS)
    _script(SECURITY)


def downgrade() -> None:
    _script(
        "DROP MATERIALIZED VIEW IF EXISTS wallet_stats;"
        "DROP TABLE IF EXISTS wallet_withdrawals, wallet_earnings, wallet_revenue_events,"
        " wallet_partners, wallet_entries, wallet_transfers, wallet_accounts,"
        " idempotency_keys CASCADE;"
        "DROP FUNCTION IF EXISTS wallet_resolve(TEXT, BIGINT, BOOLEAN, TEXT);"
        "DROP FUNCTION IF EXISTS wallet_transfer(TEXT, BIGINT, BIGINT, BIGINT, TEXT, TEXT, TEXT,"
        " BOOLEAN);"
        "DROP FUNCTION IF EXISTS wallet_ensure_partitions(INTEGER);"
        "DROP FUNCTION IF EXISTS wallet_forbid_change();"
    )
