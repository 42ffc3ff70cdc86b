"""Migration 0016_topup_unspent (ADR 0045): its backfill replays each wallet's history in
posting order (the same step function the ledger then runs), it goes down to 0015's
functions (they still post) and back up, replaying again."""

from __future__ import annotations

import asyncio
import uuid
from uuid import uuid4

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import make_url, pool
from sqlalchemy.ext.asyncio import create_async_engine

from surge.kit.db import migrate

REVISION = "0016_topup_unspent"


def test_the_topup_unspent_migration_backfills_goes_down_and_up(
    server_urls: tuple[str, str],
) -> None:
    url = make_url(server_urls[0]).set(database=f"surge_unspent_{uuid.uuid4().hex[:8]}")
    fresh = url.render_as_string(hide_password=False)
    config = migrate.alembic_config(fresh)
    previous = ScriptDirectory.from_config(config).get_revision(REVISION).down_revision
    assert previous == "0015_debt"

    async def run(*statements: str, query: str | None = None) -> list[tuple[object, ...]]:
        engine = create_async_engine(fresh, poolclass=pool.NullPool)
        try:
            async with engine.begin() as connection:
                for statement in statements:
                    await connection.exec_driver_sql(statement)
                if query is None:
                    return []
                return [tuple(row) for row in (await connection.exec_driver_sql(query)).all()]
        finally:
            await engine.dispose()

    def post(key: str, debit: int, credit: int, amount: int) -> str:
        return (
            f"SELECT wallet_transfer('{key}', {debit}, {credit}, {amount}, 'USD', 't', NULL, false)"
        )

    async def drop() -> None:
        admin = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        async with admin.connect() as connection:
            await connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}"')
        await admin.dispose()

    unspent_sql = "SELECT topup_unspent, topup_spent FROM wallet_accounts WHERE id = 1003"
    gone_sql = (
        "SELECT (SELECT count(*) FROM pg_proc WHERE proname = 'wallet_topup_step'), "
        "(SELECT count(*) FROM information_schema.columns WHERE table_name = 'wallet_accounts' "
        " AND column_name IN ('topup_unspent', 'topup_spent'))"
    )
    try:
        assert migrate.ensure_database(fresh)
        command.upgrade(config, previous)
        # 1001 payments, 1002 receivables, 1003 a wallet, 1004 sales, 1005 external.
        asyncio.run(
            run(
                "INSERT INTO wallet_accounts (id, owner_id, code, currency, guarded) "
                "OVERRIDING SYSTEM VALUE VALUES (1001, NULL, 'payments', 'USD', false), "
                f"(1002, NULL, 'receivables', 'USD', false), (1003, '{uuid4()}', 'wallet', 'USD', true), "
                "(1004, NULL, 'sales', 'USD', true), (1005, NULL, 'external', 'USD', false)",
                post("e1", 1005, 1003, 1_000),  # earned
                post("s1", 1003, 1004, 1_000),  # spent: earnings paid
                post("t1", 1001, 1003, 1_000),  # then a top-up
                post("s2", 1003, 1004, 400),  # 400 of it spent
            )
        )
        # Written before the migration: the backfill replays it in order (the order-blind
        # formula said max(0, 1 000 − 1 400) = 0 of it was top-up credit).
        command.upgrade(config, REVISION)
        assert asyncio.run(run(query=unspent_sql)) == [(600, 400)]
        asyncio.run(run(post("s3", 1004, 1003, 300)))  # a purchase given back: restored
        assert asyncio.run(run(query=unspent_sql)) == [(900, 100)]
        command.downgrade(config, previous)
        assert asyncio.run(run(query=gone_sql)) == [(0, 0)]
        asyncio.run(run(post("t2", 1001, 1003, 500)))  # 0015's functions still post
        command.upgrade(config, REVISION)
        assert asyncio.run(run(query=unspent_sql)) == [(1_400, 100)]  # replayed again
        # A 1 500 chargeback of a 1 400 balance: 100 advanced by receivables (ADR 0042),
        # counted in, so the reversal takes 1 400 of unspent credit (what the wallet paid);
        # the shortfall was spent top-up credit (spent 100 → 0); net top-ups are 0 now.
        asyncio.run(run(post("d1:advance", 1002, 1003, 100), post("d1", 1003, 1001, 1_500)))
        assert asyncio.run(run(query=unspent_sql)) == [(0, 0)]
    finally:
        asyncio.run(drop())
