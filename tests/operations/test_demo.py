"""`make run`'s demo fleet for the reseller panel (reseller1's credit: tests/test_demo.py)."""

from __future__ import annotations

from sqlalchemy import text

from surge.demo import seed_operations
from surge.kit.runtime import Runtime
from surge.sim import PROVIDER_DEMO_ACCOUNTS, PROXY_URLS


async def test_demo_fleet_is_registered_once_and_encrypted(runtime: Runtime) -> None:
    for _ in range(2):  # idempotent
        async with runtime.db.session() as session:
            await seed_operations(session, runtime)
    async with runtime.db.session() as session:
        accounts = (
            await session.execute(text("SELECT username, secret FROM operations_provider_accounts"))
        ).all()
        labels = list(await session.scalars(text("SELECT label FROM operations_proxies")))
    names = [row.username for row in accounts]
    assert {pair.split(":")[0] for pair in PROVIDER_DEMO_ACCOUNTS.split(",")} <= set(names)
    assert len(names) == len(set(names))
    assert {url.removeprefix("http://") for url in PROXY_URLS} <= set(labels)
    assert len(labels) == len(set(labels))
    assert not any("secret" in row.secret for row in accounts)  # Fernet tokens, not passwords
