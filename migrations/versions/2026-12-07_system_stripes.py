"""System account stripes: a hot system account becomes N rows chosen by owner (ADR 0058).

Every withdrawal request credits (reserves into) the one ``holds`` row of its currency and
every top-up debits the one ``payments`` row: the row lock each takes is held until its
transaction commits, so requests of *different* owners queued on one row (ADR 0032: 5.9
withdrawals/s through synchronous replication; ADR 0053: the payments row is the ceiling of
the top-up path). A serious ledger stripes such an account: the same account split into
sub-accounts, each an ordinary ledger row with its own exact balance and before/after
history, the account's balance being their sum.

- ``stripe``: 0 for every existing row (a wallet is always stripe 0, the CHECK says so);
- ``uq_wallet_accounts_system`` becomes (code, currency, stripe): one row per stripe.

The ledger's functions are unchanged: they name system accounts by ``code`` (the top-up
and purchase running totals, ADR 0036/0045; the receivables row ``wallet_collect`` finds,
which is never striped), and every stripe of an account has its code.

Downgrade refuses (unique violation) while a stripe other than 0 holds a row: entries
point at those rows, and folding them into one would rewrite history.

Revision ID: 0019_system_stripes
Revises: 0018_four_eyes
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0019_system_stripes"
down_revision: str | None = "0018_four_eyes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: PostgreSQL 11+ adds the column without rewriting the table.
    op.execute("ALTER TABLE wallet_accounts ADD COLUMN stripe SMALLINT NOT NULL DEFAULT 0")
    op.execute(
        "ALTER TABLE wallet_accounts ADD CONSTRAINT ck_wallet_accounts_stripe "
        "CHECK (stripe >= 0 AND (owner_id IS NULL OR stripe = 0))"
    )
    op.execute("DROP INDEX uq_wallet_accounts_system")
    op.execute(
        "CREATE UNIQUE INDEX uq_wallet_accounts_system ON wallet_accounts (code, currency, stripe) "
        "WHERE owner_id IS NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX uq_wallet_accounts_system")
    op.execute(
        "CREATE UNIQUE INDEX uq_wallet_accounts_system ON wallet_accounts (code, currency) "
        "WHERE owner_id IS NULL"
    )
    op.execute("ALTER TABLE wallet_accounts DROP CONSTRAINT ck_wallet_accounts_stripe")
    op.execute("ALTER TABLE wallet_accounts DROP COLUMN stripe")
