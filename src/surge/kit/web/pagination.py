"""Keyset pagination: one ``Page[T]`` reply shape and one query helper, on the opaque
cursors of ``kit.web.cursor``.

    page = await keyset_page(
        session, select(Item).where(Item.owner_id == owner),
        Keyset((Item.created_at, Item.id), (moment, uuid.UUID), descending=True),
        limit=limit, cursor=cursor, scalars=True,
    )
    return Page[ItemRead](items=[ItemRead.model_validate(i) for i in page.items],
                          next_cursor=page.next_cursor)

The cursor is the last row's sort key; the next page is the rows strictly past it in the
listing's order, so rows inserted meanwhile never shift a page (unlike OFFSET). The sort
key must be unique (end it with the primary key).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.elements import ColumnElement

from surge.kit.web.cursor import decode_cursor, encode_cursor

T = TypeVar("T")
#: A listing's query parameters (docs/architecture.md §5: default 50, at most 100):
#: ``limit: Limit = 50, cursor: Cursor = None``.
Limit = Annotated[int, Query(ge=1, le=100, description="Items per page.")]
Cursor = Annotated[
    str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
]
#: A sort column: a mapped attribute (``Item.created_at``) or any column expression.
Column = ColumnElement[Any] | QueryableAttribute[Any]


class Page(BaseModel, Generic[T]):
    """One page of a listing and the cursor of the next one (None on the last page)."""

    items: list[T]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class Keyset:
    """A listing's unique sort key: its columns, a cursor parser per column, the direction."""

    columns: tuple[Column, ...]
    parsers: tuple[Callable[[str], Any], ...]
    descending: bool = False

    def after(self, cursor: str) -> ColumnElement[bool]:
        """The condition for rows past ``cursor`` (a forged cursor → ``InvalidCursor``, 400)."""
        values = decode_cursor(cursor, *self.parsers)
        key: Any = self.columns[0] if len(self.columns) == 1 else tuple_(*self.columns)
        bound: Any = values[0] if len(self.columns) == 1 else tuple_(*values)
        condition: ColumnElement[bool] = key < bound if self.descending else key > bound
        return condition

    def order(self) -> list[ColumnElement[Any]]:
        return [c.desc() if self.descending else c.asc() for c in self.columns]

    def cursor_of(self, item: Any) -> str:
        return encode_cursor(*(getattr(item, _name(c)) for c in self.columns))


@dataclass(frozen=True, slots=True)
class Slice(Generic[T]):
    """What ``keyset_page`` found: the rows of this page and the next cursor."""

    items: list[T]
    next_cursor: str | None


def _name(column: Column) -> str:
    name = getattr(column, "key", None) or getattr(column, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"a keyset column needs a name: {column!r}")
    return name


async def keyset_page(
    session: AsyncSession,
    statement: Select[*tuple[Any, ...]],
    keyset: Keyset,
    *,
    limit: int,
    cursor: str | None,
    scalars: bool = False,
) -> Slice[Any]:
    """Run ``statement`` for the page after ``cursor`` (``limit`` rows, one more fetched to
    know whether another page follows). ``scalars``: the statement selects one entity."""
    if cursor:
        statement = statement.where(keyset.after(cursor))
    statement = statement.order_by(*keyset.order()).limit(limit + 1)
    result = await session.execute(statement)
    rows: Sequence[Any] = result.scalars().all() if scalars else result.all()
    items = list(rows[:limit])
    more = len(rows) > limit and bool(items)
    return Slice(items, keyset.cursor_of(items[-1]) if more else None)
