"""Migration 0015_debt (ADR 0042): it goes down to 0014's functions (they still post) and
back up, summing the receivables entries into ``debt`` again."""

from __future__ import annotations

import asyncio
import uuid
from uuid import uuid4

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import make_url, pool
from sqlalchemy.ext.asyncio import create_async_engine

from surge.kit.db import migrate

REVISION = "0015_debt"


def test_the_debt_migration_goes_down_and_up_again(server_urls: tuple[str, str]) -> None:
    url = make_url(server_urls[0]).set(database=f"surge_debt_{uuid.uuid4().hex[:8]}")
    fresh = url.render_as_string(hide_password=False)
    config = migrate.alembic_config(fresh)
    previous = ScriptDirectory.from_config(config).get_revision(REVISION).down_revision
    assert isinstance(previous, str)

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

    debt_sql = "SELECT id, balance, debt FROM wallet_accounts WHERE id > 1000 ORDER BY id"
    collect_sql = "SELECT count(*) FROM pg_proc WHERE proname = 'wallet_collect'"
    try:
        assert migrate.ensure_database(fresh)
        command.upgrade(config, REVISION)
        # 1001 payments, 1002 receivables, 1003 a wallet, 1004 sales.
        asyncio.run(
            run(
                "INSERT INTO wallet_accounts (id, owner_id, code, currency, guarded) "
                "OVERRIDING SYSTEM VALUE VALUES (1001, NULL, 'payments', 'USD', false), "
                f"(1002, NULL, 'receivables', 'USD', false), (1003, '{uuid4()}', 'wallet', 'USD', true), "
                "(1004, NULL, 'sales', 'USD', true)",
                post("t1", 1001, 1003, 1_000),  # top-up
                post("s1", 1003, 1004, 1_000),  # spent
                post("d1:advance", 1002, 1003, 700),  # a 700 chargeback of spent money:
                post("d1", 1003, 1001, 700),  # advanced by receivables, then reversed
            )
        )
        assert asyncio.run(run(query=debt_sql))[1:3] == [(1002, -700, 0), (1003, 0, 700)]
        command.downgrade(config, previous)
        assert asyncio.run(run(query=collect_sql)) == [(0,)]
        asyncio.run(run(post("t2", 1001, 1003, 300)))  # 0014's functions still post
        command.upgrade(config, REVISION)
        assert asyncio.run(run(query=debt_sql))[2] == (1003, 300, 700)  # summed again
        repaid = asyncio.run(run(query="SELECT wallet_collect(1003, 't2:debt', NULL)"))
        assert repaid == [(300,)]
        assert asyncio.run(run(query=debt_sql))[1:3] == [(1002, -400, 0), (1003, 0, 400)]
    finally:
        asyncio.run(drop())
