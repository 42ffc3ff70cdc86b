"""Migration 0020_pending_credits (ADR 0065): down again posts what is pending first — a
pending credit is money owed to its account, never dropped with the table."""

from __future__ import annotations

from tests.fixtures.migration_db import post, scratch_database

REVISION = "0020_pending_credits"
TABLE = "SELECT count(*) FROM information_schema.tables WHERE table_name = 'wallet_pending_credits'"
# A transfer from the wallet (2) to external (1) whose credit went pending, as
# ``wallet_transfer_deferring`` leaves it: the transfer, the debit and its entry, the row.
PENDING = (
    "INSERT INTO wallet_transfers (idempotency_key, debit_account_id, credit_account_id, "
    "amount, currency, phase, kind) VALUES ('deferred', 2, 1, 300, 'USD', 'single', 't')",
    "UPDATE wallet_accounts SET balance = balance - 300 WHERE id = 2",
    "INSERT INTO wallet_entries (account_id, transfer_id, counterparty_account_id, amount, "
    "balance_before, balance_after, kind) SELECT 2, id, 1, -300, 1000, 700, 't' "
    "FROM wallet_transfers WHERE idempotency_key = 'deferred'",
    "INSERT INTO wallet_pending_credits (account_id, transfer_id, counterparty_account_id, "
    "amount, currency, kind) SELECT 1, id, 2, 300, 'USD', 't' "
    "FROM wallet_transfers WHERE idempotency_key = 'deferred'",
)


def test_going_down_posts_the_pending_credits_first(server_urls: tuple[str, str]) -> None:
    with scratch_database(server_urls[0], REVISION) as db:
        db.upgrade()
        db.run(
            "INSERT INTO wallet_accounts (code, currency, guarded) VALUES ('external', 'USD', false)",
            "INSERT INTO wallet_accounts (owner_id, code, currency) "
            "VALUES (gen_random_uuid(), 'wallet', 'USD')",
            post("fund", 1, 2, 1_000),
            *PENDING,
        )
        assert db.run(query="SELECT id, balance FROM wallet_accounts ORDER BY id") == [
            (1, -1_000),
            (2, 700),
        ]
        db.downgrade()
        assert db.run(query=TABLE) == [(0,)]
        assert db.run(
            query="SELECT amount, balance_before, balance_after FROM wallet_entries "
            "WHERE account_id = 1 ORDER BY id DESC LIMIT 1"
        ) == [(300, -1_000, -700)]
        assert db.run(query="SELECT sum(balance) FROM wallet_accounts") == [(0,)]
        db.upgrade()
        assert db.run(query=TABLE) == [(1,)]
