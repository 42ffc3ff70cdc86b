"""Every query of the operations domain (the service calls these; routes never do)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import and_, case, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.web.cursor import moment
from surge.kit.web.pagination import Keyset, Slice, keyset_page
from surge.models.operations import (
    Attempt,
    EgressProxy,
    Operation,
    Price,
    ProviderAccount,
    Reseller,
)

OPERATIONS_NEWEST_FIRST = Keyset(
    (Operation.created_at, Operation.id), (moment, UUID), descending=True
)

# ---- accounts -----------------------------------------------------------------------------


async def add_account(session: AsyncSession, *, username: str, secret: str) -> ProviderAccount:
    account = ProviderAccount(id=uuid4(), username=username, secret=secret, status="active")
    session.add(account)
    await session.flush()
    await session.refresh(account)
    return account


async def account_by_username(session: AsyncSession, username: str) -> ProviderAccount | None:
    found: ProviderAccount | None = await session.scalar(
        select(ProviderAccount).where(ProviderAccount.username == username)
    )
    return found


async def get_account(session: AsyncSession, account_id: UUID) -> ProviderAccount | None:
    return await session.get(ProviderAccount, account_id)


async def list_accounts(session: AsyncSession) -> list[ProviderAccount]:
    rows = await session.scalars(select(ProviderAccount).order_by(ProviderAccount.username))
    return list(rows)


async def lease_account(
    session: AsyncSession, *, lease: timedelta, exclude: list[UUID]
) -> tuple[ProviderAccount, UUID] | None:
    """The least recently used active account nobody holds, held for ``lease`` under a new
    token (``FOR UPDATE SKIP LOCKED``: two workers never get the same row)."""
    token = uuid4()
    now = func.now()
    pick = (
        select(ProviderAccount.id)
        .where(
            ProviderAccount.status == "active",
            or_(ProviderAccount.leased_until.is_(None), ProviderAccount.leased_until < now),
            ProviderAccount.id.not_in(exclude) if exclude else text("true"),
        )
        .order_by(ProviderAccount.last_used_at.asc().nulls_first())
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    account: ProviderAccount | None = await session.scalar(
        update(ProviderAccount)
        .where(ProviderAccount.id == pick)
        .values(
            leased_until=now + lease,
            lease_token=token,
            last_used_at=now,
            uses=ProviderAccount.uses + 1,
        )
        .returning(ProviderAccount)
    )
    return (account, token) if account is not None else None


async def accounts_due_in(session: AsyncSession) -> timedelta | None:
    """How long until some provider account can be leased: zero when an active one is free
    (it was only locked by a concurrent lease), the earliest end of a lease when every active
    one is held, None when none will be free by itself (all disabled or failed, or none)."""
    now = func.now()
    row = (
        await session.execute(
            select(
                func.bool_or(
                    or_(ProviderAccount.leased_until.is_(None), ProviderAccount.leased_until <= now)
                ),
                func.min(ProviderAccount.leased_until) - now,
            ).where(ProviderAccount.status == "active")
        )
    ).one()
    free, wait = row
    if free is None:  # no active account at all
        return None
    if free:
        return timedelta(0)
    left: timedelta = wait
    return max(left, timedelta(0))


async def release_account(session: AsyncSession, account_id: UUID, token: UUID) -> None:
    await session.execute(
        update(ProviderAccount)
        .where(ProviderAccount.id == account_id, ProviderAccount.lease_token == token)
        .values(leased_until=None, lease_token=None)
    )


async def set_account_status(
    session: AsyncSession, account_id: UUID, *, status: str, error: str | None = None,
    failed: bool = False,
) -> ProviderAccount | None:  # fmt: skip
    values: dict[str, Any] = {"status": status}
    if error is not None:
        values["last_error"] = error
    if failed:
        values["failures"] = ProviderAccount.failures + 1
    found: ProviderAccount | None = await session.scalar(
        update(ProviderAccount)
        .where(ProviderAccount.id == account_id)
        .values(**values)
        .returning(ProviderAccount)
    )
    return found


# ---- proxies ------------------------------------------------------------------------------


async def add_proxy(session: AsyncSession, *, label: str, secret: str) -> EgressProxy:
    proxy = EgressProxy(id=uuid4(), label=label, secret=secret, status="active")
    session.add(proxy)
    await session.flush()
    await session.refresh(proxy)
    return proxy


async def proxy_by_label(session: AsyncSession, label: str) -> EgressProxy | None:
    found: EgressProxy | None = await session.scalar(
        select(EgressProxy).where(EgressProxy.label == label)
    )
    return found


async def list_proxies(session: AsyncSession) -> list[EgressProxy]:
    return list(await session.scalars(select(EgressProxy).order_by(EgressProxy.label)))


async def pick_proxy(
    session: AsyncSession, *, exclude: list[UUID], probe_hold: timedelta,
    prefer: UUID | None = None,
) -> EgressProxy | None:  # fmt: skip
    """A proxy for the next request: an inactive one whose re-check is due first (one probe
    fleet-wide: ``probing_until`` is claimed in the same UPDATE), else ``prefer`` when it is
    active (the proxy the account's cached session was made on), else the least recently
    used active one."""
    now = func.now()
    due = and_(
        EgressProxy.status == "inactive",
        EgressProxy.retry_at <= now,
        or_(EgressProxy.probing_until.is_(None), EgressProxy.probing_until < now),
    )
    order: list[Any] = [case((EgressProxy.status == "inactive", 0), else_=1)]
    if prefer is not None:
        order.append(case((EgressProxy.id == prefer, 0), else_=1))
    order.append(EgressProxy.last_used_at.asc().nulls_first())
    pick = (
        select(EgressProxy.id)
        .where(
            or_(EgressProxy.status == "active", due),
            EgressProxy.id.not_in(exclude) if exclude else text("true"),
        )
        .order_by(*order)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    found: EgressProxy | None = await session.scalar(
        update(EgressProxy)
        .where(EgressProxy.id == pick)
        .values(
            last_used_at=now,
            requests=EgressProxy.requests + 1,
            probing_until=case((EgressProxy.status == "inactive", now + probe_hold), else_=None),
        )
        .returning(EgressProxy)
    )
    return found


async def fleet_due_in(session: AsyncSession) -> timedelta | None:
    """How long until some proxy can be picked: zero when one is active (it was only locked
    by a concurrent pick), the earliest re-check (or end of a running probe) when every one
    is cooling down, None when none will ever come back by itself (all disabled, or none)."""
    now = func.now()
    due = func.greatest(EgressProxy.retry_at, EgressProxy.probing_until, now)
    row = (
        await session.execute(
            select(
                func.bool_or(EgressProxy.status == "active"),
                func.min(case((EgressProxy.status == "inactive", due), else_=None)) - now,
            ).where(EgressProxy.status.in_(("active", "inactive")))
        )
    ).one()
    active, wait = row
    if active:
        return timedelta(0)
    return wait if wait is None else max(wait, timedelta(0))


async def proxy_ok(session: AsyncSession, proxy_id: UUID, *, probe: bool) -> bool:
    """The proxy worked; True when this re-activated it. Only the fleet's probe (a request
    that picked the proxy while it was inactive) re-activates it: a request picked before
    the proxy was marked, answered after, says nothing about the block that marked it."""
    reactivated = None
    if probe:
        reactivated = await session.scalar(
            update(EgressProxy)
            .where(EgressProxy.id == proxy_id, EgressProxy.status == "inactive")
            .values(status="active", reason=None, failures=0, probing_until=None, retry_at=None)
            .returning(EgressProxy.id)
        )
    if reactivated is None:
        await session.execute(
            update(EgressProxy)
            .where(
                EgressProxy.id == proxy_id,
                EgressProxy.status == "active",  # an inactive one keeps its backoff count
                EgressProxy.failures > 0,
            )
            .values(failures=0)
        )
    return reactivated is not None


async def proxy_down(
    session: AsyncSession, proxy_id: UUID, *, reason: str, error: str, blocked: bool,
    max_failures: int, backoff: Callable[[int], timedelta],
) -> EgressProxy | None:  # fmt: skip
    """Blocked: inactive at once. Failing: inactive after ``max_failures`` in a row, or at
    once when it was inactive already (a failed probe). ``backoff(n)`` is the delay before
    the re-check after the n-th time down."""
    proxy: EgressProxy | None = await session.scalar(
        select(EgressProxy)
        .where(EgressProxy.id == proxy_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if proxy is None or proxy.status == "disabled":
        return None
    at = datetime.now(UTC)
    proxy.last_error = error[:300]
    proxy.failures += 1
    proxy.probing_until = None
    if blocked:
        proxy.blocks += 1
        proxy.blocked_at = at
    if blocked or proxy.status == "inactive" or proxy.failures >= max_failures:
        proxy.status = "inactive"
        proxy.reason = reason
        proxy.retry_at = at + backoff(max(proxy.blocks, proxy.failures))
    await session.flush()
    return proxy


async def set_proxy_status(
    session: AsyncSession, proxy_id: UUID, *, status: str
) -> EgressProxy | None:
    values: dict[str, Any] = {"status": status, "probing_until": None}
    if status == "active":
        values |= {"reason": None, "failures": 0, "retry_at": None}
    found: EgressProxy | None = await session.scalar(
        update(EgressProxy)
        .where(EgressProxy.id == proxy_id)
        .values(**values)
        .returning(EgressProxy)
    )
    return found


# ---- prices -------------------------------------------------------------------------------


async def tier_of(session: AsyncSession, user_id: UUID) -> str | None:
    tier: str | None = await session.scalar(
        select(Reseller.tier).where(Reseller.user_id == user_id)
    )
    return tier


async def set_tier(session: AsyncSession, user_id: UUID, tier: str) -> None:
    await session.execute(
        text(
            "INSERT INTO operations_resellers (user_id, tier) VALUES (:u, :t) "
            "ON CONFLICT (user_id) DO UPDATE SET tier = EXCLUDED.tier"
        ),
        {"u": user_id, "t": tier},
    )


async def prices(session: AsyncSession, tier: str) -> dict[str, int]:
    rows = await session.execute(
        select(Price.package, Price.monthly_price).where(Price.tier == tier).order_by(Price.package)
    )
    return {package: int(price) for package, price in rows.all()}


async def tiers(session: AsyncSession) -> set[str]:
    return set(await session.scalars(select(Price.tier).distinct()))


# ---- operations ---------------------------------------------------------------------------


async def add_operation(session: AsyncSession, operation: Operation) -> Operation:
    session.add(operation)
    await session.flush()
    return operation


async def get_operation(
    session: AsyncSession, operation_id: UUID, *, owner_id: UUID | None = None, lock: bool = False
) -> Operation | None:
    stmt = select(Operation).where(Operation.id == operation_id)
    if owner_id is not None:
        stmt = stmt.where(Operation.owner_id == owner_id)
    if lock:
        stmt = stmt.with_for_update()
    found: Operation | None = await session.scalar(stmt.execution_options(populate_existing=True))
    return found


async def list_operations(
    session: AsyncSession, *, owner_id: UUID | None, status: str | None, limit: int,
    cursor: str | None,
) -> Slice[Operation]:  # fmt: skip
    stmt = select(Operation)
    if owner_id is not None:
        stmt = stmt.where(Operation.owner_id == owner_id)
    if status is not None:
        stmt = stmt.where(Operation.status == status)
    return await keyset_page(
        session, stmt, OPERATIONS_NEWEST_FIRST, limit=limit, cursor=cursor, scalars=True
    )


async def try_lock_operation(session: AsyncSession, operation_id: UUID) -> bool:
    """One attempt at a time per operation, fleet-wide: a transaction-scoped advisory lock
    (it dies with its connection, so a killed worker never keeps it)."""
    key = int.from_bytes(operation_id.bytes[:8], "big", signed=True)
    return bool(await session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}))


async def start_operation(session: AsyncSession, operation_id: UUID) -> Operation | None:
    """queued/running → running; None when the operation is already decided."""
    found: Operation | None = await session.scalar(
        update(Operation)
        .where(Operation.id == operation_id, Operation.status.in_(("queued", "running")))
        .values(status="running", error=None, updated_at=func.now())
        .returning(Operation)
    )
    return found


async def set_waiting(session: AsyncSession, operation_id: UUID, *, error: str) -> None:
    """running → queued while its job waits for the fleet (``error`` says what for)."""
    await session.execute(
        update(Operation)
        .where(Operation.id == operation_id, Operation.status == "running")
        .values(status="queued", error=error[:500], updated_at=func.now())
    )


async def mark_sent(session: AsyncSession, operation_id: UUID) -> None:
    await session.execute(
        update(Operation)
        .where(Operation.id == operation_id, Operation.sent_at.is_(None))
        .values(sent_at=func.now(), updated_at=func.now())
    )


async def add_attempt(
    session: AsyncSession, operation_id: UUID, *, attempt: int, account_id: UUID | None,
    proxy_id: UUID | None, outcome: str, detail: str | None, started_at: datetime,
) -> None:  # fmt: skip
    session.add(
        Attempt(
            operation_id=operation_id,
            attempt=attempt,
            account_id=account_id,
            proxy_id=proxy_id,
            outcome=outcome,
            detail=detail,
            started_at=started_at,
        )
    )
    await session.flush()


async def attempts(session: AsyncSession, operation_id: UUID) -> list[Attempt]:
    rows = await session.scalars(
        select(Attempt).where(Attempt.operation_id == operation_id).order_by(Attempt.id)
    )
    return list(rows)


async def orphans(session: AsyncSession, *, older_than: timedelta, limit: int) -> list[UUID]:
    """Undecided operations no job will run any more (their job failed: stalled past its
    limit, or attempts exhausted by a crash on the last one)."""
    rows = await session.execute(
        text(
            "SELECT o.id FROM operations o "
            "WHERE o.status IN ('queued', 'running') "
            "AND o.updated_at < now() - make_interval(secs => :age) "
            "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.dedup_key = 'op:' || o.id::text "
            "                AND j.state IN ('queued', 'active')) "
            "ORDER BY o.updated_at LIMIT :limit"
        ),
        {"age": older_than.total_seconds(), "limit": limit},
    )
    return [row[0] for row in rows.all()]


async def status_counts(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(Operation.status, func.count()).group_by(Operation.status))
    return {status: int(count) for status, count in rows.all()}


async def now(session: AsyncSession) -> datetime:
    value: datetime = await session.scalar(select(func.now()))  # type: ignore[assignment]
    return value
