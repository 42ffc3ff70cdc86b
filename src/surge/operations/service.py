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
        ├── OperationKeyMismatch     422  Idempotency-Key already used for another operation
        ├── DuplicateAccount         409
        ├── DuplicateProxy           409
        ├── NotInReview              409  resolving an operation that is not in review
        └── ProviderNotConfigured    503  OPERATIONS_PROVIDER_URL is empty
"""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID, uuid4, uuid5

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.approvals import approvals
from surge.audit.service import audit as audit_service
from surge.kit.jobs import Snooze, enqueue
from surge.kit.runtime import Runtime
from surge.models.audit import AdminApproval
from surge.models.operations import EgressProxy, Operation, ProviderAccount
from surge.notifications.service import notifications as notifications_service
from surge.operations import repository
from surge.operations.attempts import Attempts
from surge.operations.errors import (
    AccountNotFound,
    DuplicateAccount,
    DuplicateProxy,
    InvalidOperation,
    NotInReview,
    OperationError,
    OperationKeyMismatch,
    OperationNotFound,
    ProviderNotConfigured,
    ProxyNotFound,
    RetryLater,
)
from surge.operations.runtime import provider_client, sealer
from surge.wallet.funds import funds as funds_service

__all__ = [
    "RUN_JOB",
    "AccountNotFound",
    "DuplicateAccount",
    "DuplicateProxy",
    "InvalidOperation",
    "NotInReview",
    "OperationError",
    "OperationKeyMismatch",
    "OperationNotFound",
    "OperationsService",
    "ProviderNotConfigured",
    "ProxyNotFound",
    "RetryLater",
    "operations",
    "provider_client",
    "sealer",
]

log = structlog.get_logger()

RUN_JOB = "operations.run"
CARD = re.compile(r"^\d{10,16}$")
DEFAULT_TIER = "retail"
TERMINAL = frozenset({"succeeded", "failed", "needs_review"})
#: Namespace of operation ids: uuid5(owner id + client key) is the same on every retry.
OPERATION_NAMESPACE = UUID("6a1d3c1e-92b4-4f5e-8d0c-5b7e2f9a4c33")


def operation_id_for(owner_id: UUID, key: str) -> UUID:
    """The operation a client's ``Idempotency-Key`` names, for ever (its HTTP record
    expires after a day; a replay after that must not buy the renewal twice)."""
    return uuid5(OPERATION_NAMESPACE, f"{owner_id}:{key}")


def proxy_label(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "socks5") or not parts.hostname:
        raise InvalidOperation("A proxy URL is scheme://[user:password@]host:port.")
    return f"{parts.hostname}:{parts.port or 80}"


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
        package: str | None = None, months: int = 0, key: str | None = None,
    ) -> Operation:  # fmt: skip
        """Validate, price, reserve and enqueue, in the caller's transaction. With the
        client's ``key`` the operation's id derives from it: the same key is the same
        operation (another body under it: 422), however late it comes back."""
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
        operation_id = uuid4() if key is None else operation_id_for(owner_id, key)
        if key is not None:
            existing = await repository.get_operation(session, operation_id, owner_id=owner_id)
            if existing is not None:
                asked = (kind, card, package, months)
                if (existing.kind, existing.card, existing.package, existing.months) != asked:
                    raise OperationKeyMismatch(
                        "This Idempotency-Key was already used for another operation."
                    )
                return existing
        operation = Operation(
            id=operation_id, owner_id=owner_id, kind=kind, card=card, package=package, months=months,
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
        found = await repository.list_operations(
            session, owner_id=owner_id, status=status, limit=limit, cursor=cursor
        )
        return found.items, found.next_cursor

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
        self, session: AsyncSession, runtime: Runtime, actor_id: UUID, operation_id: UUID, *,
        performed: bool, note: str | None = None, request_id: str | None = None,
        approved_by: UUID | None = None,
    ) -> Operation:  # fmt: skip
        """An admin's decision on an operation in review: the provider did it (settle) or
        not (release). Audited in the same transaction (the API and the console both).
        Releasing more than ``APPROVAL_THRESHOLD`` gives a reseller its money back on one
        person's word: it waits for a second administrator (ADR 0059)."""
        operation = await repository.get_operation(session, operation_id, lock=True)
        if operation is None:
            raise OperationNotFound("No such operation.")
        if operation.status != "needs_review":
            raise NotInReview(f"The operation is {operation.status}, not in review.")
        if not performed:
            await approvals.gate(
                session, runtime, actor_id, action=RELEASE, subject_type="operation",
                subject_id=str(operation_id), amount=operation.amount,
                currency=operation.currency, params={"note": note}, approved_by=approved_by,
                request_id=request_id,
            )  # fmt: skip
        await self._finish(session, operation, succeeded=performed, error=operation.error)
        after = {"status": operation.status, "performed": performed, "note": note}
        if approved_by is not None:
            after["approved_by"] = str(approved_by)
        await audit_service.record(
            session, actor_id, action="operations.operation.resolve", subject_type="operation",
            subject_id=str(operation_id), before={"status": "needs_review"}, after=after,
            request_id=request_id,
        )  # fmt: skip
        return operation

    async def reap(self, session: AsyncSession, *, older_than: timedelta) -> dict[str, int]:
        """Decide operations whose job is gone (failed after too many stalls): released when
        nothing state-changing was ever sent, ``needs_review`` otherwise. Never twice: each
        is locked like an attempt, and only undecided ones are touched."""
        decided = {"failed": 0, "needs_review": 0}
        for operation_id in await repository.orphans(session, older_than=older_than, limit=100):
            if not await repository.try_lock_operation(session, operation_id):
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
            got = await repository.try_lock_operation(lock_session, operation_id)
            if not got:
                raise RetryLater("another attempt of this operation is running")
            attempts = Attempts(runtime, started, attempt)
            verdict, detail = await attempts.drive()
        if verdict == "wait":
            await self._wait_for_fleet(runtime, started, attempts.fleet_due_in, detail)
            verdict = "unclear"  # waited long enough: this attempt counts
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

    async def _wait_for_fleet(
        self, runtime: Runtime, operation: Operation, due_in: timedelta | None, detail: str
    ) -> None:
        """Every proxy is cooling down, or every provider account is held by other jobs:
        back to ``queued`` and snooze the job (the attempt not spent) until one may be due,
        re-checking at least every provider timeout (a running probe may free the proxy
        before its hold ends; a job ending releases its account before its lease does).
        Returns only when the operation has waited ``OPERATIONS_FLEET_WAIT`` already."""
        settings = runtime.settings
        async with runtime.db.session() as s:
            waited = await repository.now(s) - operation.created_at
            if waited >= settings.OPERATIONS_FLEET_WAIT:
                return
            await repository.set_waiting(s, operation.id, error=f"WAITING: {detail}")
        delay = min(due_in or timedelta(0), settings.OPERATIONS_TIMEOUT)
        delay = max(delay, timedelta(milliseconds=50)) * random.uniform(1.0, 1.25)
        log.info("operations.waiting_for_fleet", operation_id=str(operation.id),
                 retry_in_s=round(delay.total_seconds(), 3))  # fmt: skip
        raise Snooze(delay, detail)

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


operations = OperationsService()

#: The four-eyes action of releasing a reviewed operation's reservation (ADR 0059).
RELEASE = "operations.operation.release"


async def _release_approved(
    session: AsyncSession, runtime: Runtime, approval: AdminApproval, checker_id: UUID,
    request_id: str | None,
) -> dict[str, Any]:  # fmt: skip
    operation = await operations.resolve(
        session, runtime, approval.maker_id, UUID(approval.subject_id), performed=False,
        note=approval.params.get("note"), request_id=request_id, approved_by=checker_id,
    )  # fmt: skip
    return {"status": operation.status}


approvals.register(RELEASE, _release_approved)
