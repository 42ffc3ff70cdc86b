"""Reseller operations run on the upstream provider's website by the worker fleet.

A reseller asks for an operation (renew a card's package for N months, refresh a card's
signal). ``create`` validates and prices it, reserves the price on the reseller's wallet
(``funds.reserve``, a pending transfer) and enqueues ``operations.run`` — one transaction, so
there is never a job without its reservation nor a reservation without its job. ``run``
(the job) leases a provider account, picks an egress proxy, reuses or makes a provider
session, performs the call and then settles the reservation (success) or releases it
(final failure) in the job's fenced transaction: never both, never neither.

Lost replies (ADR 0017): ``sent_at`` is committed *before* a state-changing call leaves;
from then on no attempt sends it again before asking the provider (card history, by our
operation id as reference) whether it happened. When nobody can tell by the last attempt,
the operation goes to ``needs_review`` with its reservation still pending, and an admin
settles or releases it (audited).

    SurgeError
    └── OperationError
        ├── OperationNotFound        404
        ├── AccountNotFound          404
        ├── ProxyNotFound            404
        ├── InvalidOperation         422  card, package or months refused
        ├── DuplicateAccount         409
        ├── DuplicateProxy           409
        ├── NotInReview              409  resolving an operation that is not in review
        └── ProviderNotConfigured    503  OPERATIONS_PROVIDER_URL is empty
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import orjson
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.errors import Conflict, NotFound, ServiceUnavailable, SurgeError, UnprocessableEntity
from surge.kit.jobs import enqueue
from surge.kit.redis import RedisUnavailable
from surge.kit.runtime import Runtime
from surge.kit.security.sealing import Sealer
from surge.models.operations import EgressProxy, Operation, ProviderAccount
from surge.notifications.service import notifications as notifications_service
from surge.operations import repository
from surge.operations.provider import (
    AccountFailed,
    Blocked,
    ProviderClient,
    ProviderFault,
    ProviderSession,
    ProxyFailed,
    Rejected,
    SessionExpired,
    Unclear,
)
from surge.wallet.funds import funds as funds_service

log = structlog.get_logger()

RUN_JOB = "operations.run"
CARD = re.compile(r"^\d{10,16}$")
DEFAULT_TIER = "retail"
TERMINAL = frozenset({"succeeded", "failed", "needs_review"})


class OperationError(SurgeError):
    pass


class OperationNotFound(OperationError, NotFound):
    pass


class AccountNotFound(OperationError, NotFound):
    pass


class ProxyNotFound(OperationError, NotFound):
    pass


class InvalidOperation(OperationError, UnprocessableEntity):
    pass


class DuplicateAccount(OperationError, Conflict):
    pass


class DuplicateProxy(OperationError, Conflict):
    pass


class NotInReview(OperationError, Conflict):
    pass


class ProviderNotConfigured(OperationError, ServiceUnavailable):
    pass


class RetryLater(Exception):
    """This attempt could not finish; the job is retried (its backoff) unless it was the last."""


# ---- per-process state (Runtime extensions) -----------------------------------------------


def provider_client(runtime: Runtime) -> ProviderClient:
    """The process's provider client (one httpx client per egress proxy)."""
    client = runtime.extensions.get("operations.provider")
    if client is None:
        url = runtime.settings.OPERATIONS_PROVIDER_URL
        if not url:
            raise ProviderNotConfigured("OPERATIONS_PROVIDER_URL is not set.")
        client = ProviderClient(url, timeout=runtime.settings.OPERATIONS_TIMEOUT.total_seconds())
        runtime.extensions["operations.provider"] = client
    assert isinstance(client, ProviderClient)
    return client


def sealer(runtime: Runtime) -> Sealer:
    """Fernet keyed from SECRET_KEY for account passwords and proxy URLs."""
    found = runtime.extensions.get("operations.sealer")
    if found is None:
        found = Sealer(runtime.settings.SECRET_KEY.get_secret_value(), purpose="operations")
        runtime.extensions["operations.sealer"] = found
    assert isinstance(found, Sealer)
    return found


@dataclass(frozen=True, slots=True)
class Lease:
    account_id: UUID
    username: str
    password: str
    token: UUID
    since: datetime


def session_key(account_id: UUID, proxy_id: UUID) -> str:
    return f"operations:session:{account_id}:{proxy_id}"


def affinity_key(account_id: UUID) -> str:
    """The proxy an account last worked through (its session there is likely cached)."""
    return f"operations:affinity:{account_id}"


def proxy_label(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "socks5") or not parts.hostname:
        raise InvalidOperation("A proxy URL is scheme://[user:password@]host:port.")
    return f"{parts.hostname}:{parts.port or 80}"


def backoff(base: timedelta, cap: timedelta) -> Callable[[int], timedelta]:
    """Randomized exponential backoff of a proxy's re-check (scrapy-rotating-proxies):
    ``d = min(cap, base × 2^(n-1))``, waited ``d/2 + random(0, d/2)`` (equal jitter: never
    almost zero, so a blocked address is not hammered by the next probe)."""

    def delay(n: int) -> timedelta:
        d = min(cap.total_seconds(), base.total_seconds() * 2 ** max(0, n - 1))
        return timedelta(seconds=d / 2 + random.uniform(0, d / 2))

    return delay


class OperationsService:
    """Stateless; see the module docstring."""

    # ---- reseller -------------------------------------------------------------------------
    async def tier(self, session: AsyncSession, owner_id: UUID) -> str:
        return await repository.tier_of(session, owner_id) or DEFAULT_TIER

    async def prices(self, session: AsyncSession, owner_id: UUID) -> tuple[str, dict[str, int]]:
        tier = await self.tier(session, owner_id)
        return tier, await repository.prices(session, tier)

    async def set_tier(self, session: AsyncSession, owner_id: UUID, *, tier: str) -> None:
        if tier not in await repository.tiers(session):
            raise InvalidOperation(f"Unknown tier {tier!r}.")
        await repository.set_tier(session, owner_id, tier)

    async def create(
        self, session: AsyncSession, runtime: Runtime, owner_id: UUID, *, kind: str, card: str,
        package: str | None = None, months: int = 0,
    ) -> Operation:  # fmt: skip
        """Validate, price, reserve and enqueue, in the caller's transaction."""
        settings = runtime.settings
        if not CARD.match(card):
            raise InvalidOperation("A card number is 10 to 16 digits.")
        if kind == "renew":
            _, price_list = await self.prices(session, owner_id)
            if package not in price_list:
                raise InvalidOperation(f"Package {package!r} is not offered.")
            if not 1 <= months <= 12:
                raise InvalidOperation("Months must be between 1 and 12.")
            amount = price_list[package] * months
        elif kind == "signal":
            package, months, amount = None, 0, settings.OPERATIONS_SIGNAL_PRICE
        else:
            raise InvalidOperation(f"Unknown operation kind {kind!r}.")
        operation = Operation(
            id=uuid4(), owner_id=owner_id, kind=kind, card=card, package=package, months=months,
            amount=amount, currency=settings.WALLET_CURRENCY, status="queued",
        )  # fmt: skip
        await repository.add_operation(session, operation)
        operation.hold_id = await funds_service.reserve(
            session, owner_id, amount=amount, currency=operation.currency,
            key=f"op:{operation.id}:reserve", kind="operation", reference=str(operation.id),
        )  # fmt: skip
        await session.flush()
        attempts = settings.OPERATIONS_MAX_ATTEMPTS
        await enqueue(
            session, RUN_JOB, {"operation_id": str(operation.id), "max_attempts": attempts},
            dedup_key=f"op:{operation.id}", max_attempts=attempts,
        )  # fmt: skip
        log.info("operations.created", operation_id=str(operation.id), kind=kind, amount=amount)
        return operation

    async def get(
        self, session: AsyncSession, operation_id: UUID, *, owner_id: UUID | None
    ) -> tuple[Operation, list[Any]]:
        operation = await repository.get_operation(session, operation_id, owner_id=owner_id)
        if operation is None:
            raise OperationNotFound("No such operation.")
        return operation, await repository.attempts(session, operation_id)

    async def page(
        self, session: AsyncSession, *, owner_id: UUID | None, status: str | None = None,
        limit: int = 50, cursor: str | None = None,
    ) -> tuple[list[Operation], str | None]:  # fmt: skip
        return await repository.list_operations(
            session, owner_id=owner_id, status=status, limit=limit, cursor=cursor
        )

    # ---- admin ----------------------------------------------------------------------------
    async def add_account(
        self, session: AsyncSession, runtime: Runtime, *, username: str, password: str
    ) -> ProviderAccount:
        if await repository.account_by_username(session, username) is not None:
            raise DuplicateAccount(f"Account {username!r} exists.")
        secret = sealer(runtime).seal(password)
        return await repository.add_account(session, username=username, secret=secret)

    async def accounts(self, session: AsyncSession) -> list[ProviderAccount]:
        return await repository.list_accounts(session)

    async def set_account_status(
        self, session: AsyncSession, account_id: UUID, *, status: str
    ) -> ProviderAccount:
        found = await repository.set_account_status(session, account_id, status=status)
        if found is None:
            raise AccountNotFound("No such provider account.")
        return found

    async def add_proxy(self, session: AsyncSession, runtime: Runtime, *, url: str) -> EgressProxy:
        label = proxy_label(url)
        if await repository.proxy_by_label(session, label) is not None:
            raise DuplicateProxy(f"Proxy {label} exists.")
        return await repository.add_proxy(session, label=label, secret=sealer(runtime).seal(url))

    async def proxies(self, session: AsyncSession) -> list[EgressProxy]:
        return await repository.list_proxies(session)

    async def set_proxy_status(
        self, session: AsyncSession, proxy_id: UUID, *, status: str
    ) -> EgressProxy:
        found = await repository.set_proxy_status(session, proxy_id, status=status)
        if found is None:
            raise ProxyNotFound("No such proxy.")
        return found

    async def resolve(
        self, session: AsyncSession, operation_id: UUID, *, performed: bool
    ) -> Operation:
        """An admin's decision on an operation in review: the provider did it (settle) or
        not (release). The caller audits it."""
        operation = await repository.get_operation(session, operation_id, lock=True)
        if operation is None:
            raise OperationNotFound("No such operation.")
        if operation.status != "needs_review":
            raise NotInReview(f"The operation is {operation.status}, not in review.")
        await self._finish(session, operation, succeeded=performed, error=operation.error)
        return operation

    async def reap(self, session: AsyncSession, *, older_than: timedelta) -> dict[str, int]:
        """Decide operations whose job is gone (failed after too many stalls): released when
        nothing state-changing was ever sent, ``needs_review`` otherwise. Never twice: each
        is locked like an attempt, and only undecided ones are touched."""
        decided = {"failed": 0, "needs_review": 0}
        for operation_id in await repository.orphans(session, older_than=older_than, limit=100):
            if not await session.scalar(_TRY_LOCK, {"k": _lock_key(operation_id)}):
                continue
            operation = await repository.get_operation(session, operation_id, lock=True)
            if operation is None or operation.status in TERMINAL:
                continue
            if operation.sent_at is None:
                await self._finish(session, operation, succeeded=False, error="GAVE_UP: job ended")
            else:
                operation.status = "needs_review"
                operation.error = "GAVE_UP: job ended after the call was sent"
                operation.updated_at = datetime.now(UTC)
                await session.flush()
            decided[operation.status] += 1
            log.warning(
                "operations.reaped", operation_id=str(operation_id), status=operation.status
            )
        return decided

    async def counts(self, session: AsyncSession) -> dict[str, int]:
        return await repository.status_counts(session)

    # ---- the worker -----------------------------------------------------------------------
    async def run(
        self, session: AsyncSession, runtime: Runtime, operation_id: UUID, *, attempt: int,
        last: bool,
    ) -> str:  # fmt: skip
        """One attempt of the job. ``session`` is the job's fenced unit of work: the verdict
        (settle/release, final status) is written there and commits with the job's
        completion. Progress the next attempt must see (running, ``sent_at``, the timeline,
        proxy and account health) is committed at once in short transactions of its own.
        Returns the status; raises ``RetryLater`` for another attempt."""
        db = runtime.db
        async with db.session() as s:
            started = await repository.start_operation(s, operation_id)
        if started is None:
            return "decided"
        # One attempt at a time per operation, fleet-wide, even if a lease was lost: the
        # transaction-scoped advisory lock dies with its connection (a killed worker).
        async with db.session() as lock_session:
            got = await lock_session.scalar(_TRY_LOCK, {"k": _lock_key(operation_id)})
            if not got:
                raise RetryLater("another attempt of this operation is running")
            verdict, detail = await Attempts(self, runtime, started, attempt).drive()
        operation = await repository.get_operation(session, operation_id, lock=True)
        if operation is None or operation.status in TERMINAL:
            return "decided"
        if verdict == "done":
            await self._finish(session, operation, succeeded=True, error=None)
        elif verdict == "rejected":
            await self._finish(session, operation, succeeded=False, error=detail)
        elif not last:
            raise RetryLater(detail)
        elif operation.sent_at is None:
            # Nothing state-changing ever left: releasing is safe.
            await self._finish(session, operation, succeeded=False, error=detail)
        else:
            operation.status = "needs_review"
            operation.error = detail
            operation.updated_at = datetime.now(UTC)
            await session.flush()
            log.warning("operations.needs_review", operation_id=str(operation_id), error=detail)
        return operation.status

    async def _finish(
        self, session: AsyncSession, operation: Operation, *, succeeded: bool, error: str | None
    ) -> None:
        assert operation.hold_id is not None
        if succeeded:
            await funds_service.settle(
                session, operation.hold_id, key=f"op:{operation.id}:settle", kind="operation"
            )
        else:
            await funds_service.release(
                session, operation.hold_id, key=f"op:{operation.id}:release", kind="operation"
            )
        now = datetime.now(UTC)
        operation.status = "succeeded" if succeeded else "failed"
        operation.error = error
        operation.updated_at = now
        operation.finished_at = now
        await session.flush()
        await notifications_service.operation_finished(session, owner_id=operation.owner_id, operation_id=operation.id, status=operation.status, detail=error)  # fmt: skip
        log.info("operations.finished", operation_id=str(operation.id), status=operation.status)


_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(:k)")


def _lock_key(operation_id: UUID) -> int:
    return int.from_bytes(operation_id.bytes[:8], "big", signed=True)


class Attempts:
    """One attempt's walk: lease an account, pick proxies, reuse or make a session, ask
    before resending, perform. Returns (verdict, detail): ``done``, ``rejected`` or
    ``unclear``."""

    def __init__(
        self, service: OperationsService, runtime: Runtime, operation: Operation, attempt: int
    ) -> None:
        self.service = service
        self.runtime = runtime
        self.settings = runtime.settings
        self.operation = operation
        self.attempt = attempt
        self.client = provider_client(runtime)
        self.sealer = sealer(runtime)
        self.backoff = backoff(
            self.settings.OPERATIONS_PROXY_BACKOFF, self.settings.OPERATIONS_PROXY_BACKOFF_MAX
        )
        #: A state-changing call left in this attempt (its answer may be lost).
        self.sent = False

    async def record(
        self, lease: Lease | None, proxy: EgressProxy | None, outcome: str, detail: str | None,
        started: datetime,
    ) -> None:  # fmt: skip
        async with self.runtime.db.session() as s:
            await repository.add_attempt(
                s, self.operation.id, attempt=self.attempt,
                account_id=lease.account_id if lease else None,
                proxy_id=proxy.id if proxy else None, outcome=outcome, detail=detail,
                started_at=started,
            )  # fmt: skip

    async def lease(self) -> Lease | None:
        """An account, waiting up to the account lease for one to be free."""
        deadline = time.monotonic() + self.settings.OPERATIONS_ACCOUNT_LEASE.total_seconds() / 4
        delay = 0.05
        while True:
            async with self.runtime.db.session() as s:
                got = await repository.lease_account(
                    s, lease=self.settings.OPERATIONS_ACCOUNT_LEASE, exclude=[]
                )
                now = await repository.now(s)
            if got is not None:
                account, token = got
                password = self.sealer.open(account.secret)
                return Lease(account.id, account.username, password, token, now)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 2, 1.0)

    async def release(self, lease: Lease) -> None:
        async with self.runtime.db.session() as s:
            await repository.release_account(s, lease.account_id, lease.token)

    async def drive(self) -> tuple[str, str]:
        lease = await self.lease()
        if lease is None:
            await self.record(None, None, "no_account", "every provider account is busy or failed",
                              datetime.now(UTC))  # fmt: skip
            return "unclear", "NO_ACCOUNT: every provider account is busy or failed"
        try:
            return await self._with_account(lease)
        finally:
            await self.release(lease)

    async def _with_account(self, lease: Lease) -> tuple[str, str]:
        tried: list[UUID] = []
        last = "NO_PROXY: no egress proxy available"
        # Crawlee's binding, fleet-wide: back to the proxy this account's session lives on.
        prefer = await self._affinity(lease.account_id)
        for _ in range(max(1, self.settings.OPERATIONS_PROXY_TRIES)):
            async with self.runtime.db.session() as s:
                proxy = await repository.pick_proxy(
                    s, exclude=tried, probe_hold=self.settings.OPERATIONS_TIMEOUT * 2,
                    prefer=prefer,
                )  # fmt: skip
            if proxy is None:
                break
            tried.append(proxy.id)
            started = datetime.now(UTC)
            try:
                verdict = await self._through(lease, proxy)
            except Blocked as fault:
                await self._proxy_down(proxy, fault, blocked=True)
                last = f"PROXY_BLOCKED: {fault}"
                await self.record(lease, proxy, "proxy_blocked", str(fault), started)
                continue
            except ProxyFailed as fault:
                await self._proxy_down(proxy, fault, blocked=False)
                last = f"PROXY_FAILED: {fault}"
                await self.record(lease, proxy, "proxy_failed", str(fault), started)
                continue
            except AccountFailed as fault:
                await self._account_failed(lease, str(fault))
                await self.record(lease, proxy, "account_failed", str(fault), started)
                return "unclear", f"ACCOUNT_FAILED: {fault}"
            except Rejected as fault:
                await self._proxy_ok(proxy)
                await self.record(lease, proxy, "rejected", str(fault), started)
                return "rejected", f"REJECTED: {fault}"
            except (Unclear, SessionExpired) as fault:
                await self.record(lease, proxy, "unclear", str(fault), started)
                last = f"UNCLEAR: {fault}"
                if self.sent:
                    return "unclear", last
                continue  # nothing state-changing left: another proxy may do better
            await self._proxy_ok(proxy, lease=lease, outcome=verdict, started=started)
            if proxy.id != prefer:
                await self._remember(lease.account_id, proxy.id)
            return "done", verdict
        return "unclear", last

    async def _through(self, lease: Lease, proxy: EgressProxy) -> str:
        """Run the operation through ``proxy``; returns ``performed`` or ``confirmed``."""
        url = self.sealer.open(proxy.secret)
        key = session_key(lease.account_id, proxy.id)
        for fresh in (False, True):
            session = None if fresh else await self._cached(key)
            if session is None:
                session = await self.client.login(url, lease.username, lease.password)
                await self._store(key, session)
            try:
                return await self._perform(url, session)
            except SessionExpired:
                await self._forget(key)
                if fresh:
                    raise
        raise AssertionError("unreachable")

    async def _perform(self, url: str, session: ProviderSession) -> str:
        op = self.operation
        reference = str(op.id)
        # The lost-reply rule: once sent, it may have happened. Ask, never resend blindly.
        if op.sent_at is not None and reference in await self.client.history(
            url, session, card=op.card
        ):
            return "confirmed"
        async with self.runtime.db.session() as s:
            await repository.mark_sent(s, op.id)
        op.sent_at = op.sent_at or datetime.now(UTC)
        self.sent = True
        try:
            await self._send(url, session)
        except Unclear:
            # No answer (dropped, 5xx, timeout): ask right away, through the same session.
            if reference in await self.client.history(url, session, card=op.card):
                return "confirmed"
            raise
        return "performed"

    async def _send(self, url: str, session: ProviderSession) -> None:
        op = self.operation
        if op.kind == "renew":
            assert op.package is not None
            await self.client.renew(
                url, session, card=op.card, package=op.package, months=op.months,
                reference=str(op.id),
            )  # fmt: skip
        else:
            await self.client.refresh_signal(url, session, card=op.card, reference=str(op.id))

    # ---- shared state ---------------------------------------------------------------------
    async def _cached(self, key: str) -> ProviderSession | None:
        try:
            raw = await self.runtime.redis.call(lambda r: r.get(key))
        except RedisUnavailable:
            return None  # Redis down costs a login, never the operation
        if not raw:
            return None
        data = orjson.loads(raw)
        return ProviderSession(sid=data["sid"], csrf=data["csrf"])

    async def _store(self, key: str, session: ProviderSession) -> None:
        ttl = int(self.settings.OPERATIONS_SESSION_TTL.total_seconds())
        payload = orjson.dumps({"sid": session.sid, "csrf": session.csrf})
        with contextlib.suppress(RedisUnavailable):
            await self.runtime.redis.call(lambda r: r.set(key, payload, ex=ttl))

    async def _affinity(self, account_id: UUID) -> UUID | None:
        try:
            raw = await self.runtime.redis.call(lambda r: r.get(affinity_key(account_id)))
        except RedisUnavailable:
            return None
        return UUID(raw.decode() if isinstance(raw, bytes) else str(raw)) if raw else None

    async def _remember(self, account_id: UUID, proxy_id: UUID) -> None:
        ttl = int(self.settings.OPERATIONS_SESSION_TTL.total_seconds())
        with contextlib.suppress(RedisUnavailable):
            await self.runtime.redis.call(
                lambda r: r.set(affinity_key(account_id), str(proxy_id), ex=ttl)
            )

    async def _forget(self, key: str) -> None:
        with contextlib.suppress(RedisUnavailable):
            await self.runtime.redis.call(lambda r: r.delete(key))

    async def _proxy_ok(
        self, proxy: EgressProxy, *, lease: Lease | None = None, outcome: str | None = None,
        started: datetime | None = None,
    ) -> None:  # fmt: skip
        """The proxy worked (and, in the same transaction, the step's timeline row)."""
        async with self.runtime.db.session() as s:
            if await repository.proxy_ok(s, proxy.id):
                log.info("operations.proxy.reactivated", proxy=proxy.label)
            if outcome is not None and started is not None:
                await repository.add_attempt(
                    s, self.operation.id, attempt=self.attempt,
                    account_id=lease.account_id if lease else None, proxy_id=proxy.id,
                    outcome=outcome, detail=None, started_at=started,
                )  # fmt: skip

    async def _proxy_down(self, proxy: EgressProxy, fault: ProviderFault, *, blocked: bool) -> None:
        async with self.runtime.db.session() as s:
            found = await repository.proxy_down(
                s, proxy.id, reason="PROXY_BLOCKED" if blocked else "PROXY_FAILED",
                error=str(fault), blocked=blocked, max_failures=3, backoff=self.backoff,
            )  # fmt: skip
        if found is not None and found.status == "inactive":
            log.warning(
                "operations.proxy.blocked" if blocked else "operations.proxy.inactive",
                proxy=proxy.label, reason=found.reason, retry_at=str(found.retry_at),
            )  # fmt: skip

    async def _account_failed(self, lease: Lease, reason: str) -> None:
        async with self.runtime.db.session() as s:
            await repository.set_account_status(
                s, lease.account_id, status="failed", error=reason, failed=True
            )
        log.warning("operations.account.failed", account=lease.username, reason=reason)


operations = OperationsService()
