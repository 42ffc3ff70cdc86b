"""The wallet's queries. Reads are owner-scoped, cursor-paginated and replica-safe.

Every function takes the owner id and filters by it; the ones reading RLS-protected tables
also set ``surge.owner_id`` for the transaction, so PostgreSQL itself hides other owners'
rows (defence in depth: a forgotten filter returns nothing instead of someone else's money).
Listings page with ``kit.web.pagination``. Money itself moves only through ``ledger``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import Row, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.web.cursor import bigint, moment
from surge.kit.web.pagination import Keyset, Slice, keyset_page
from surge.models.wallet import Earning, Entry, Partner, RevenueEvent, Transfer, Withdrawal


async def moved_under(session: AsyncSession, key: str) -> int | None:
    """The amount of the ledger transfer made under idempotency ``key``, or None."""
    value = await session.scalar(
        text("SELECT amount FROM wallet_transfers WHERE idempotency_key = :k"), {"k": key}
    )
    return None if value is None else int(value)


async def topup_flows(session: AsyncSession, wallet: int) -> tuple[int, int]:
    """(net top-up credit, posted purchases) of ``wallet``: what came in from the payment
    provider minus its reversals, and what was paid for sales. Running totals on the account
    row, kept by the ledger's functions in each posting's transaction (ADR 0036): one row
    read, whatever the wallet's history."""
    row = (
        await session.execute(
            text("SELECT topup_net, purchases_posted FROM wallet_accounts WHERE id = :w"),
            {"w": wallet},
        )
    ).one()
    return int(row[0]), int(row[1])


async def topup_unspent(session: AsyncSession, wallet: int) -> int:
    """The top-up credit still in ``wallet`` (ADR 0045): what came in from the payment
    provider, minus what posted purchases and reversals took of it, in the order they
    happened. The account row's running total: one row read."""
    value = await session.scalar(
        text("SELECT topup_unspent FROM wallet_accounts WHERE id = :w"), {"w": wallet}
    )
    return int(value or 0)


async def scope_to_owner(session: AsyncSession, owner_id: UUID) -> None:
    """Row-level security for the rest of this transaction (see the migration's policies)."""
    await session.execute(
        text("SELECT set_config('surge.owner_id', :o, true)"), {"o": str(owner_id)}
    )


#: History in posting order: ``id`` comes from one sequence and each account's legs are
#: written under that account's row lock, so within an account it is the order of the
#: balance chain. ``created_at`` is the transaction's start: two concurrent postings
#: would list their balances out of order (migration 0005 indexes the sequence).
ENTRIES_NEWEST_FIRST = Keyset((Entry.id,), (bigint,), descending=True)
EARNINGS_NEWEST_FIRST = Keyset((Earning.id,), (bigint,), descending=True)
WITHDRAWALS_NEWEST_FIRST = Keyset(
    (Withdrawal.created_at, Withdrawal.id), (moment, UUID), descending=True
)
WITHDRAWALS_OLDEST_FIRST = Keyset((Withdrawal.created_at, Withdrawal.id), (moment, UUID))
_WITHDRAWAL_COLUMNS = (
    Withdrawal.id, Withdrawal.amount, Withdrawal.currency, Withdrawal.status,
    Withdrawal.reason, Withdrawal.decided_at, Withdrawal.created_at,
)  # fmt: skip


async def entries(
    session: AsyncSession, account_id: int, *, limit: int, cursor: str | None
) -> Slice[Row[Any]]:
    statement = select(
        Entry.id, Entry.transfer_id, Entry.kind, Entry.amount, Entry.balance_before,
        Entry.balance_after, Entry.reference, Entry.created_at,
    ).where(Entry.account_id == account_id)  # fmt: skip
    return await keyset_page(session, statement, ENTRIES_NEWEST_FIRST, limit=limit, cursor=cursor)


async def earnings(
    session: AsyncSession, owner_id: UUID, *, limit: int, cursor: str | None
) -> Slice[Row[Any]]:
    await scope_to_owner(session, owner_id)
    statement = select(
        Earning.id, Earning.event_id, Earning.event_kind, Earning.shown_profit, Earning.amount,
        Earning.currency, Earning.commission_bps, Earning.created_at,
    ).where(Earning.owner_id == owner_id)  # fmt: skip
    return await keyset_page(session, statement, EARNINGS_NEWEST_FIRST, limit=limit, cursor=cursor)


async def withdrawals(
    session: AsyncSession, owner_id: UUID, *, limit: int, cursor: str | None
) -> Slice[Row[Any]]:
    await scope_to_owner(session, owner_id)
    statement = select(*_WITHDRAWAL_COLUMNS).where(Withdrawal.owner_id == owner_id)
    return await keyset_page(
        session, statement, WITHDRAWALS_NEWEST_FIRST, limit=limit, cursor=cursor
    )


async def withdrawals_by_status(
    session: AsyncSession, status: str, *, limit: int, cursor: str | None
) -> Slice[Row[Any]]:
    """Every owner's withdrawals in one status, oldest first (the admin's approval queue)."""
    statement = select(*_WITHDRAWAL_COLUMNS, Withdrawal.owner_id).where(Withdrawal.status == status)
    return await keyset_page(
        session, statement, WITHDRAWALS_OLDEST_FIRST, limit=limit, cursor=cursor
    )


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


# ---- writes and locks (the service's use cases) ----------------------------------------------
async def upsert_partner(
    session: AsyncSession, owner_id: UUID, *, share_bps: int, commission_bps: int, active: bool
) -> Partner:
    await session.execute(
        text(
            "INSERT INTO wallet_partners (owner_id, share_bps, commission_bps, active) "
            "VALUES (:o, :s, :c, :a) ON CONFLICT (owner_id) DO UPDATE SET "
            "share_bps = EXCLUDED.share_bps, commission_bps = EXCLUDED.commission_bps, "
            "active = EXCLUDED.active"
        ),
        {"o": owner_id, "s": share_bps, "c": commission_bps, "a": active},
    )
    partner = await session.get(Partner, owner_id, populate_existing=True)
    assert partner is not None
    return partner


async def insert_revenue_event(
    session: AsyncSession,
    *,
    event_id: str,
    kind: str,
    profit: int,
    currency: str,
    occurred_at: datetime,
) -> tuple[RevenueEvent, bool]:
    """(the event, whether this call inserted it): its id is the idempotency key."""
    inserted = (
        await session.execute(
            text(
                "INSERT INTO wallet_revenue_events (id, kind, profit, currency, occurred_at) "
                "VALUES (:id, :kind, :profit, :cur, :at) ON CONFLICT (id) DO NOTHING "
                "RETURNING id"
            ),
            {"id": event_id, "kind": kind, "profit": profit, "cur": currency, "at": occurred_at},
        )
    ).scalar_one_or_none()
    event = await session.get(RevenueEvent, event_id, populate_existing=True)
    assert event is not None
    return event, inserted is not None


async def revenue_event(session: AsyncSession, event_id: str) -> RevenueEvent | None:
    return await session.get(RevenueEvent, event_id)


async def partners_to_credit(
    session: AsyncSession, event: RevenueEvent, *, after: UUID | None, limit: int
) -> Sequence[Row[UUID, int, int]]:
    """The next ``limit`` active partners (by owner id, after ``after``) whose terms existed
    when the event was recorded: one who joins while the batches run (or later, on a
    replay) earns nothing from it."""
    return (
        await session.execute(
            select(Partner.owner_id, Partner.share_bps, Partner.commission_bps)
            .where(
                Partner.active,
                Partner.created_at <= event.created_at,
                *([Partner.owner_id > after] if after else []),
            )
            .order_by(Partner.owner_id)
            .limit(limit)
        )
    ).all()


async def withdrawal_for_update(session: AsyncSession, withdrawal_id: UUID) -> Withdrawal | None:
    return (
        await session.execute(
            select(Withdrawal).where(Withdrawal.id == withdrawal_id).with_for_update()
        )
    ).scalar_one_or_none()


async def lock_withdrawals(
    session: AsyncSession, ids: Iterable[UUID]
) -> Sequence[Row[int, str, int]]:
    """Lock the withdrawals' rows in id order (ADR 0010's global order); their wallets,
    currencies and the holds stripes their reservations credited (ADR 0058)."""
    return (
        await session.execute(
            select(Withdrawal.account_id, Withdrawal.currency, Transfer.credit_account_id)
            .join(Transfer, Transfer.id == Withdrawal.transfer_id)
            .where(Withdrawal.id.in_(list(ids)))
            .order_by(Withdrawal.id)
            .with_for_update(of=Withdrawal)
        )
    ).all()


async def reserved_into(session: AsyncSession, transfer_id: int) -> int:
    """The account a pending transfer credits: the holds stripe a withdrawal's reservation
    chose, which its approval must post into and empty again (ADR 0058)."""
    return int(
        (
            await session.execute(
                select(Transfer.credit_account_id).where(Transfer.id == transfer_id)
            )
        ).scalar_one()
    )


async def system_balances(session: AsyncSession) -> list[dict[str, Any]]:
    """Every system account's balance per currency, summed over its stripes (ADR 0058), with
    its stripe count and its largest and smallest stripe: the platform's side of the ledger
    at a glance. One row per system account row scanned: a report, not a hot path."""
    rows = await session.execute(
        text(
            "SELECT code, currency, sum(balance)::bigint AS balance, "
            "  sum(pending_in)::bigint AS pending_in, sum(pending_out)::bigint AS pending_out, "
            "  count(*) AS stripes, min(balance) AS smallest, max(balance) AS largest "
            "FROM wallet_accounts WHERE owner_id IS NULL GROUP BY code, currency "
            "ORDER BY currency, code"
        )
    )
    return [dict(row._mapping) for row in rows]


async def owner_withdrawal(
    session: AsyncSession, owner_id: UUID, withdrawal_id: UUID
) -> Withdrawal | None:
    return (
        await session.execute(
            select(Withdrawal).where(
                Withdrawal.id == withdrawal_id, Withdrawal.owner_id == owner_id
            )
        )
    ).scalar_one_or_none()


async def withdrawn_within(session: AsyncSession, owner_id: UUID, *, window: timedelta) -> int:
    """What the owner asked to withdraw in the last ``window`` (database clock), pending and
    approved alike: a rejected request paid nothing and does not count. Read under the
    wallet's row lock by the withdrawal request, so two requests cannot both fit the window's
    remainder (``ix_wallet_withdrawals_owner``: owner, newest first)."""
    total = await session.scalar(
        select(func.coalesce(func.sum(Withdrawal.amount), 0)).where(
            Withdrawal.owner_id == owner_id,
            Withdrawal.created_at > func.now() - window,
            Withdrawal.status != "rejected",
        )
    )
    return int(total or 0)


async def withdrawal(session: AsyncSession, withdrawal_id: UUID) -> Withdrawal | None:
    return await session.get(Withdrawal, withdrawal_id)


async def refresh_stats_view(session: AsyncSession, lock_key: int) -> bool:
    """``REFRESH MATERIALIZED VIEW CONCURRENTLY wallet_stats``, one process at a time
    (transaction-scoped advisory lock); readers are never blocked."""
    got = await session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": lock_key})
    if not got:
        return False
    await session.execute(text("REFRESH MATERIALIZED VIEW CONCURRENTLY wallet_stats"))
    return True


async def ensure_partitions(session: AsyncSession, months_ahead: int) -> int:
    created = await session.scalar(text("SELECT wallet_ensure_partitions(:n)"), {"n": months_ahead})
    return int(created or 0)
