"""``kit.web.pagination``: keyset pages over a real PostgreSQL table, both directions, ties on
the leading column, and forged cursors refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import Column, DateTime, Integer, MetaData, Table, Uuid, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.runtime import Runtime
from surge.kit.web.cursor import InvalidCursor, bigint, moment
from surge.kit.web.pagination import Keyset, Page, keyset_page

metadata = MetaData()
items = Table(
    "pagination_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("ref", Uuid, nullable=False),
    prefixes=["TEMPORARY"],
)
BY_ID_DESC = Keyset((items.c.id,), (bigint,), descending=True)
BY_TIME = Keyset((items.c.at, items.c.id), (moment, bigint))


async def _fill(session: AsyncSession, n: int) -> None:
    await session.run_sync(lambda s: metadata.create_all(s.connection()))
    same = datetime(2026, 1, 1, tzinfo=UTC)  # every row ties on `at`: the id breaks ties
    await session.execute(
        insert(items), [{"id": i, "at": same, "ref": uuid.uuid4()} for i in range(1, n + 1)]
    )


async def _walk(session: AsyncSession, keyset: Keyset, limit: int) -> list[int]:
    seen: list[int] = []
    cursor = None
    while True:
        page = await keyset_page(session, select(items), keyset, limit=limit, cursor=cursor)
        seen += [row.id for row in page.items]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


async def test_every_row_once_in_order_both_directions(runtime: Runtime) -> None:
    async with runtime.db.session() as session:
        await _fill(session, 23)
        assert await _walk(session, BY_ID_DESC, 5) == list(range(23, 0, -1))
        assert await _walk(session, BY_TIME, 7) == list(range(1, 24))
        assert await _walk(session, BY_TIME, 23) == list(range(1, 24))  # exact: no next page
        await session.rollback()


async def test_forged_cursors_are_refused(runtime: Runtime) -> None:
    async with runtime.db.session() as session:
        await _fill(session, 3)
        for cursor in ("%%%", "MXwy", "bm90IGEgY3Vyc29y"):
            with pytest.raises(InvalidCursor):
                await keyset_page(session, select(items), BY_ID_DESC, limit=2, cursor=cursor)
        await session.rollback()


def test_page_is_one_generic_reply_shape() -> None:
    page = Page[int](items=[1, 2], next_cursor="abc")
    assert page.model_dump() == {"items": [1, 2], "next_cursor": "abc"}
    assert Page[str](items=[]).next_cursor is None
