"""Fixtures shared by the kit's database tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from surge.kit.db import Database, PoolConfig


@pytest.fixture
async def db(server_urls: tuple[str, str]) -> AsyncIterator[Database]:
    """One pooled connection: every unit of work reuses it (and its prepared statements), so
    a connection left in a bad state (a transaction still open, a dead socket) would be seen
    by the next one."""
    database = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=1))
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def table(db: Database) -> AsyncIterator[str]:
    """A scratch table ``(v bigint PRIMARY KEY)`` of the test's own, dropped after it."""
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    async with db.session() as session:
        await session.execute(text(f"CREATE TABLE {name} (v bigint PRIMARY KEY)"))
    yield name
    async with db.session() as session:
        await session.execute(text(f"DROP TABLE {name}"))
