"""Migration 0015_debt (ADR 0042): it goes down to 0014's functions (they still post) and
back up, summing the receivables entries into ``debt`` again."""

from __future__ import annotations

from uuid import uuid4

from tests.fixtures.migration_db import post, scratch_database

REVISION = "0015_debt"


def test_the_debt_migration_goes_down_and_up_again(server_urls: tuple[str, str]) -> None:
    debt_sql = "SELECT id, balance, debt FROM wallet_accounts WHERE id > 1000 ORDER BY id"
    collect_sql = "SELECT count(*) FROM pg_proc WHERE proname = 'wallet_collect'"
    with scratch_database(server_urls[0], REVISION) as db:
        db.upgrade()
        # 1001 payments, 1002 receivables, 1003 a wallet, 1004 sales.
        db.run(
            "INSERT INTO wallet_accounts (id, owner_id, code, currency, guarded) "
            "OVERRIDING SYSTEM VALUE VALUES (1001, NULL, 'payments', 'USD', false), "
            f"(1002, NULL, 'receivables', 'USD', false), (1003, '{uuid4()}', 'wallet', 'USD', true), "
            "(1004, NULL, 'sales', 'USD', true)",
            post("t1", 1001, 1003, 1_000),  # top-up
            post("s1", 1003, 1004, 1_000),  # spent
            post("d1:advance", 1002, 1003, 700),  # a 700 chargeback of spent money:
            post("d1", 1003, 1001, 700),  # advanced by receivables, then reversed
        )
        assert db.run(query=debt_sql)[1:3] == [(1002, -700, 0), (1003, 0, 700)]
        db.downgrade()
        assert db.run(query=collect_sql) == [(0,)]
        db.run(post("t2", 1001, 1003, 300))  # 0014's functions still post
        db.upgrade()
        assert db.run(query=debt_sql)[2] == (1003, 300, 700)  # summed again
        repaid = db.run(query="SELECT wallet_collect(1003, 't2:debt', NULL)")
        assert repaid == [(300,)]
        assert db.run(query=debt_sql)[1:3] == [(1002, -400, 0), (1003, 0, 400)]
