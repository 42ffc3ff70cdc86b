"""Fixtures shared by the kit's database tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

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
