"""`make run` loads demo data through the domain services, once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from surge.config import Settings
from surge.demo import (
    ACCOUNTS,
    DEMO_PASSWORD,
    PARTNERS,
    RESELLER_CREDIT,
    REVENUE_EVENTS,
    email,
    seed_async,
)
from surge.kit.db import migrate
from surge.kit.runtime import Runtime


@pytest.fixture
def own_settings(settings: Settings) -> Iterator[Settings]:
    """A database of the test's own, migrated: other tests (the console's browser test, the
    operations demo test) seed the demo into the shared one first."""
    url = make_url(settings.DATABASE_URL).set(database=f"surge_demo_{uuid.uuid4().hex[:8]}")
    fresh = url.render_as_string(hide_password=False)
    migrate.ensure_database(fresh)
    migrate.upgrade(fresh)
    try:
        yield settings.model_copy(update={"DATABASE_URL": fresh})
    finally:

        async def drop() -> None:
            admin = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
            async with admin.connect() as connection:
                await connection.exec_driver_sql(
                    f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'
                )
            await admin.dispose()

        asyncio.run(drop())


async def test_demo_seed_is_idempotent_and_goes_through_the_services(
    own_settings: Settings,
) -> None:
    first = await seed_async(own_settings)
    again = await seed_async(own_settings)
    assert first is True
    assert again is False
    runtime = Runtime(own_settings)
    await runtime.start()
    try:
        await _check(runtime)
    finally:
        await runtime.stop()


async def _check(runtime: Runtime) -> None:
    async with runtime.db.session() as session:
        emails = [email(local) for local, *_ in ACCOUNTS + PARTNERS]
        users = (
            await session.execute(
                text("SELECT email, role, password_hash FROM users WHERE email = ANY(:e)"),
                {"e": emails},
            )
        ).all()
        assert len(users) == len(emails)
        assert all(row.password_hash.startswith("$argon2id$") for row in users)
        assert all(DEMO_PASSWORD not in row.password_hash for row in users)
        partners = await session.scalar(
            text(
                "SELECT count(*) FROM wallet_partners p JOIN users u ON u.id = p.owner_id "
                "WHERE u.email = ANY(:e)"
            ),
            {"e": emails},
        )
        assert partners == len(PARTNERS)
        # each revenue event enqueued its first earnings batch in the same transaction
        jobs = await session.scalar(
            text("SELECT count(*) FROM jobs WHERE dedup_key = ANY(:k)"),
            {"k": [f"earnings:{event_id}:" for event_id, *_ in REVENUE_EVENTS]},
        )
        assert jobs == len(REVENUE_EVENTS)
        audited = await session.scalar(
            text("SELECT count(*) FROM audit_log WHERE action = 'identity.plan.changed'")
        )
        assert audited >= len([a for a in ACCOUNTS if a[2] != "free"])
        # ---- operations (issue 13): reseller1 can use the panel at once, credited once
        credit = await session.scalar(
            text(
                "SELECT count(*) FROM wallet_transfers "
                "WHERE idempotency_key = 'demo:reseller1:credit' AND amount = :a"
            ),
            {"a": RESELLER_CREDIT},
        )
        assert credit == 1
