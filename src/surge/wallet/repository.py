"""The wallet's read queries: owner-scoped, cursor-paginated, replica-safe.

Every function takes the owner id and filters by it; the ones reading RLS-protected tables
also set ``surge.owner_id`` for the transaction, so PostgreSQL itself hides other owners'
rows (defence in depth: a forgotten filter returns nothing instead of someone else's money).
Cursors are ``kit.web.cursor``'s: the last row's ``(created_at, id)``, newest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.web.cursor import bigint, decode_cursor, encode_cursor, moment


def after_cursor(
    cursor: str | None, params: dict[str, Any], key: Callable[[str], object], *, older: bool
) -> str:
    """The keyset condition for rows past ``cursor`` (older ones when the listing is newest
    first), its parameters added to ``params``; "" on the first page."""
    if not cursor:
        return ""
    at, after = decode_cursor(cursor, moment, key)
    params.update(c_at=at, c_id=after)
    return f"AND (created_at, id) {'<' if older else '>'} (:c_at, :c_id)"


def page(
    rows: Sequence[Row[Any]], limit: int, key: str = "id"
) -> tuple[list[Row[Any]], str | None]:
    """The first ``limit`` rows and the cursor of the next page (we fetch limit + 1)."""
    items = list(rows[:limit])
    if len(rows) <= limit or not items:
        return items, None
    last = items[-1]
    return items, encode_cursor(last.created_at, getattr(last, key))


async def scope_to_owner(session: AsyncSession, owner_id: UUID) -> None:
    """Row-level security for the rest of this transaction (see the migration's policies)."""
    await session.execute(
        text("SELECT set_config('surge.owner_id', :o, true)"), {"o": str(owner_id)}
    )


async def entries(
    session: AsyncSession, account_id: int, *, limit: int, cursor: str | None
) -> tuple[list[Row[Any]], str | None]:
    params: dict[str, Any] = {"a": account_id, "n": limit + 1}
    after = after_cursor(cursor, params, bigint, older=True)
    rows = (
        await session.execute(
            text(
                "SELECT id, transfer_id, kind, amount, balance_before, balance_after, reference, "
                f"created_at FROM wallet_entries WHERE account_id = :a {after} "
                "ORDER BY created_at DESC, id DESC LIMIT :n"
            ),
            params,
        )
    ).all()
    return page(rows, limit)


async def earnings(
    session: AsyncSession, owner_id: UUID, *, limit: int, cursor: str | None
) -> tuple[list[Row[Any]], str | None]:
    await scope_to_owner(session, owner_id)
    params: dict[str, Any] = {"o": owner_id, "n": limit + 1}
    after = after_cursor(cursor, params, bigint, older=True)
    rows = (
        await session.execute(
            text(
                "SELECT id, event_id, event_kind, shown_profit, amount, currency, "
                f"commission_bps, created_at FROM wallet_earnings WHERE owner_id = :o {after} "
                "ORDER BY created_at DESC, id DESC LIMIT :n"
            ),
            params,
        )
    ).all()
    return page(rows, limit)


async def withdrawals(
    session: AsyncSession, owner_id: UUID, *, limit: int, cursor: str | None
) -> tuple[list[Row[Any]], str | None]:
    await scope_to_owner(session, owner_id)
    params: dict[str, Any] = {"o": owner_id, "n": limit + 1}
    after = after_cursor(cursor, params, UUID, older=True)
    rows = (
        await session.execute(
            text(
                "SELECT id, amount, currency, status, reason, decided_at, created_at "
                f"FROM wallet_withdrawals WHERE owner_id = :o {after} "
                "ORDER BY created_at DESC, id DESC LIMIT :n"
            ),
            params,
        )
    ).all()
    return page(rows, limit)


async def withdrawals_by_status(
    session: AsyncSession, status: str, *, limit: int, cursor: str | None
) -> tuple[list[Row[Any]], str | None]:
    """Every owner's withdrawals in one status, oldest first (the admin's approval queue)."""
    params: dict[str, Any] = {"s": status, "n": limit + 1}
    after = after_cursor(cursor, params, UUID, older=False)
    rows = (
        await session.execute(
            text(
                "SELECT id, owner_id, amount, currency, status, reason, decided_at, created_at "
                f"FROM wallet_withdrawals WHERE status = :s {after} "
                "ORDER BY created_at, id LIMIT :n"
            ),
            params,
        )
    ).all()
    return page(rows, limit)


async def stats(session: AsyncSession, owner_id: UUID, currency: str) -> dict[str, Any]:
    """Dashboard figures: the materialized view (everything up to its ``covered_until``)
    plus the few earnings recorded since, plus live withdrawal totals and balance."""
    await scope_to_owner(session, owner_id)
    params = {"o": owner_id, "cur": currency}
    row = (
        await session.execute(
            text(
                "WITH v AS (SELECT * FROM wallet_stats WHERE owner_id = :o AND currency = :cur), "
                "fresh AS (SELECT count(*) AS n, coalesce(sum(amount), 0) AS total, "
                "  coalesce(sum(shown_profit), 0) AS shown, max(created_at) AS last "
                "  FROM wallet_earnings WHERE owner_id = :o AND currency = :cur "
                "  AND created_at >= coalesce((SELECT covered_until FROM v), '-infinity')), "
                "w AS (SELECT coalesce(sum(amount) FILTER (WHERE status = 'approved'), 0) AS out, "
                "  coalesce(sum(amount) FILTER (WHERE status = 'pending'), 0) AS pending "
                "  FROM wallet_withdrawals WHERE owner_id = :o AND currency = :cur) "
                "SELECT coalesce((SELECT earnings_count FROM v), 0) + fresh.n AS earnings_count, "
                "  coalesce((SELECT earnings_total FROM v), 0) + fresh.total AS earnings_total, "
                "  coalesce((SELECT shown_profit_total FROM v), 0) + fresh.shown AS shown_profit_total, "
                "  greatest((SELECT last_earning_at FROM v), fresh.last) AS last_earning_at, "
                "  w.out AS withdrawn_total, w.pending AS withdrawals_pending, "
                "  (SELECT refreshed_at FROM v) AS refreshed_at "
                "FROM fresh, w"
            ),
            params,
        )
    ).one()
    return dict(row._mapping)
