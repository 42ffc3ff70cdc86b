"""Consolidation: history listed by the monotonic entry sequence.

Wallet and earnings history was ordered by ``created_at``, which is the transaction's start
(``now()``): two concurrent postings on one wallet listed their balance chain out of order.
``id`` comes from one sequence and each account's legs are written under that account's row
lock, so within an account (or an owner's earnings) ``id`` order is posting order. These
indexes serve the keyset pages by ``(account_id | owner_id, id DESC)``; the entries' old
``created_at`` index had no other reader and goes (one index less on the hot ledger path).

Revision ID: 0005_consolidation
Revises: 0004_wallet
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_consolidation"
down_revision: str | None = "0004_wallet"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE INDEX ix_wallet_entries_account_seq ON wallet_entries (account_id, id DESC)")
    op.execute("DROP INDEX ix_wallet_entries_account")
    op.execute("CREATE INDEX ix_wallet_earnings_owner_seq ON wallet_earnings (owner_id, id DESC)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_wallet_earnings_owner_seq")
    op.execute(
        "CREATE INDEX ix_wallet_entries_account ON wallet_entries "
        "(account_id, created_at DESC, id DESC)"
    )
    op.execute("DROP INDEX IF EXISTS ix_wallet_entries_account_seq")
