"""Migration 0016_topup_unspent (ADR 0045): its backfill replays each wallet's history in
posting order (the same step function the ledger then runs), it goes down to 0015's
functions (they still post) and back up, replaying again."""

from __future__ import annotations

from uuid import uuid4

from tests.fixtures.migration_db import post, scratch_database

REVISION = "0016_topup_unspent"


def test_the_topup_unspent_migration_backfills_goes_down_and_up(
    server_urls: tuple[str, str],
) -> None:
    unspent_sql = "SELECT topup_unspent, topup_spent FROM wallet_accounts WHERE id = 1003"
    gone_sql = (
        "SELECT (SELECT count(*) FROM pg_proc WHERE proname = 'wallet_topup_step'), "
        "(SELECT count(*) FROM information_schema.columns WHERE table_name = 'wallet_accounts' "
        " AND column_name IN ('topup_unspent', 'topup_spent'))"
    )
    with scratch_database(server_urls[0], REVISION) as db:
        assert db.previous == "0015_debt"
        db.upgrade(db.previous)
        # 1001 payments, 1002 receivables, 1003 a wallet, 1004 sales, 1005 external.
        db.run(
            "INSERT INTO wallet_accounts (id, owner_id, code, currency, guarded) "
            "OVERRIDING SYSTEM VALUE VALUES (1001, NULL, 'payments', 'USD', false), "
            f"(1002, NULL, 'receivables', 'USD', false), (1003, '{uuid4()}', 'wallet', 'USD', true), "
            "(1004, NULL, 'sales', 'USD', true), (1005, NULL, 'external', 'USD', false)",
            post("e1", 1005, 1003, 1_000),  # earned
            post("s1", 1003, 1004, 1_000),  # spent: earnings paid
            post("t1", 1001, 1003, 1_000),  # then a top-up
            post("s2", 1003, 1004, 400),  # 400 of it spent
        )
        # Written before the migration: the backfill replays it in order (the order-blind
        # formula said max(0, 1 000 − 1 400) = 0 of it was top-up credit).
        db.upgrade()
        assert db.run(query=unspent_sql) == [(600, 400)]
        db.run(post("s3", 1004, 1003, 300))  # a purchase given back: restored
        assert db.run(query=unspent_sql) == [(900, 100)]
        db.downgrade()
        assert db.run(query=gone_sql) == [(0, 0)]
        db.run(post("t2", 1001, 1003, 500))  # 0015's functions still post
        db.upgrade()
        assert db.run(query=unspent_sql) == [(1_400, 100)]  # replayed again
        # A 1 500 chargeback of a 1 400 balance: 100 advanced by receivables (ADR 0042),
        # counted in, so the reversal takes 1 400 of unspent credit (what the wallet paid);
        # the shortfall was spent top-up credit (spent 100 → 0); net top-ups are 0 now.
        db.run(post("d1:advance", 1002, 1003, 100), post("d1", 1003, 1001, 1_500))
        assert db.run(query=unspent_sql) == [(0, 0)]
