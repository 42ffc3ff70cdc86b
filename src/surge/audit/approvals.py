"""Four-eyes (maker-checker) for administrators' money actions (ADR 0059).

An administrator with MFA could create money alone (a revenue event, 100 % partner terms)
or pay a colluding partner out; the audit log said so afterwards. Now the owning domain's
service calls ``approvals.gate(...)`` before such an action: below the threshold, and within
what the administrator may move alone in a day (``APPROVAL_SOLO_BUDGET``, ADR 0066), it
returns and the action goes ahead; above it the request is recorded ``pending`` (audited) and
``ApprovalPending`` (202) is raised — the unit of work still commits the request
(``keep_on_error``), nothing else of the action has happened. A *different* administrator
then approves it (the domain's executor, registered under the action's name, carries the
action out in the approver's transaction, with ``approved_by``) or rejects it. The maker can
never decide their own (403, and a CHECK constraint below it); a request decided twice the
same way answers as it is; an unanswered one expires after ``APPROVAL_TTL``.

    from surge.audit.service import approvals

    await approvals.gate(session, runtime, admin_id, action="wallet.withdrawal.approve",
                         subject_type="withdrawal", subject_id=str(w.id), amount=w.amount,
                         currency=w.currency, params={}, approved_by=approved_by)

Errors:

    SurgeError
    ├── ApprovalPending (202)           recorded; waits for a second administrator
    ├── ApprovalNotFound (NotFound)     404
    ├── OwnApproval (Forbidden)         403: the maker cannot decide their own request
    ├── ApprovalConflict (Conflict)     409: another request for the subject is pending
    ├── ApprovalAlreadyDecided (Conflict) 409: decided the other way, or expired
    └── ApprovalExpired (Conflict)      409: past its expiry (now marked expired)
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit import repository
from surge.audit.service import audit as audit_service
from surge.kit.db import keep_on_error
from surge.kit.errors import Conflict, Forbidden, NotFound, SurgeError
from surge.kit.runtime import Runtime
from surge.kit.web.pagination import Slice
from surge.models.audit import AdminApproval

log = structlog.get_logger()

#: Carries an approved request out, in the approver's transaction: (session, runtime, the
#: request, the approver's id, request id) → what it did (stored on the request).
Executor = Callable[
    [AsyncSession, Runtime, AdminApproval, uuid.UUID, str | None], Awaitable[dict[str, Any]]
]


class ApprovalPending(SurgeError):
    status_code = 202
    title = "Accepted: waiting for a second administrator"


class ApprovalNotFound(NotFound):
    pass


class OwnApproval(Forbidden):
    pass


class ApprovalConflict(Conflict):
    pass


class ApprovalAlreadyDecided(Conflict):
    pass


class ApprovalExpired(Conflict):
    pass


def describe(approval: AdminApproval) -> dict[str, Any]:
    """What the API, the console and the 202 problem show of a request."""
    return {
        "id": str(approval.id), "action": approval.action,
        "subject_type": approval.subject_type, "subject_id": approval.subject_id,
        "amount": approval.amount, "currency": approval.currency, "status": approval.status,
        "maker_id": str(approval.maker_id),
        "checker_id": str(approval.checker_id) if approval.checker_id else None,
        "expires_at": approval.expires_at.isoformat(),
    }  # fmt: skip


class ApprovalService:
    """Stateless but for the executors' registry (filled at import, like job handlers)."""

    def __init__(self) -> None:
        self._executors: dict[str, Executor] = {}

    def register(self, action: str, executor: Executor) -> None:
        """The owning domain's way to carry ``action`` out once approved (one per action)."""
        self._executors[action] = executor

    async def gate(
        self,
        session: AsyncSession,
        runtime: Runtime,
        maker_id: uuid.UUID,
        *,
        action: str,
        subject_type: str,
        subject_id: str,
        amount: int,
        currency: str | None,
        params: dict[str, Any],
        approved_by: uuid.UUID | None,
        always: bool = False,
        reason: str | None = None,
        request_id: str | None = None,
    ) -> None:
        """Return when the action may go ahead now: it is being carried out by an approval
        (``approved_by``), or its ``amount`` is within ``APPROVAL_THRESHOLD`` (and not
        ``always``) and, when it moves money (an amount in a currency), within what the maker
        may still move alone in ``APPROVAL_SOLO_WINDOW`` (``APPROVAL_SOLO_BUDGET``: counted
        here, in the action's transaction, ADR 0066). Otherwise record the pending request —
        or find the one already pending for this action and subject, asked the same way —
        and raise ``ApprovalPending``. Call it before the action writes anything: the unit
        of work commits what it holds."""
        if approved_by is not None:
            return
        settings = runtime.settings
        over_budget: dict[str, Any] | None = None
        if not always and amount <= settings.APPROVAL_THRESHOLD:
            if amount <= 0 or currency is None:
                return  # moves no money of its own (terms are gated on their rate)
            spent = await repository.spend_alone(
                session, maker_id=maker_id, action=action, subject_id=subject_id,
                amount=amount, currency=currency, budget=settings.APPROVAL_SOLO_BUDGET,
                window_seconds=settings.APPROVAL_SOLO_WINDOW.total_seconds(),
            )  # fmt: skip
            if spent is None:
                return
            over_budget = {"budget": settings.APPROVAL_SOLO_BUDGET, "spent": spent,
                           "currency": currency,
                           "window_seconds": int(settings.APPROVAL_SOLO_WINDOW.total_seconds())}  # fmt: skip
        approval = await self._pending(
            session, runtime, maker_id, action=action, subject_type=subject_type,
            subject_id=subject_id, amount=amount, currency=currency, params=params,
            reason=reason, request_id=request_id,
        )  # fmt: skip
        keep_on_error(session)  # the request is the answer: it survives the 202
        if over_budget is not None:
            raise ApprovalPending(
                "Recorded: this would take what you moved alone past your budget for the "
                "window; a second administrator must approve it before it happens.",
                extra={"approval": describe(approval), "solo_budget": over_budget},
            )
        raise ApprovalPending(
            "Recorded: a second administrator must approve this before it happens.",
            extra={"approval": describe(approval)},
        )

    async def ask(
        self, session: AsyncSession, runtime: Runtime, maker_id: uuid.UUID, *, action: str,
        subject_type: str, subject_id: str, amount: int, currency: str | None,
        params: dict[str, Any], request_id: str | None = None,
    ) -> AdminApproval:  # fmt: skip
        """Record (or find) a pending request and return it, without raising: for an action
        whose first half happens now and whose effect waits (a service key is created
        inactive; a second administrator activates it)."""
        return await self._pending(
            session, runtime, maker_id, action=action, subject_type=subject_type,
            subject_id=subject_id, amount=amount, currency=currency, params=params,
            reason=None, request_id=request_id,
        )  # fmt: skip

    async def _pending(
        self, session: AsyncSession, runtime: Runtime, maker_id: uuid.UUID, *, action: str,
        subject_type: str, subject_id: str, amount: int, currency: str | None,
        params: dict[str, Any], reason: str | None, request_id: str | None,
    ) -> AdminApproval:  # fmt: skip
        for _ in range(2):  # an expired one in the way is marked expired, then once more
            created = await repository.insert_pending(
                session, action=action, subject_type=subject_type, subject_id=subject_id,
                amount=amount, currency=currency, params=params, maker_id=maker_id,
                reason=reason, ttl_seconds=runtime.settings.APPROVAL_TTL.total_seconds(),
            )  # fmt: skip
            if created is not None:
                await audit_service.record(
                    session, maker_id, action="audit.approval.request",
                    subject_type="approval", subject_id=str(created.id),
                    after={"action": action, "subject_type": subject_type,
                           "subject_id": subject_id, "amount": amount, "params": params},
                    request_id=request_id,
                )  # fmt: skip
                log.info("audit.approval.requested", approval_id=str(created.id), action=action)
                return created
            existing = await repository.pending_for(session, action=action, subject_id=subject_id)
            if existing is None:  # decided between the two statements: try again
                continue
            if await repository.is_expired(session, existing):
                existing.status = "expired"
                await session.flush()
                continue
            if (existing.maker_id, existing.amount, existing.params) != (maker_id, amount, params):
                raise ApprovalConflict(
                    f"Another request for this {subject_type} is waiting for approval "
                    f"({existing.id}): have it approved or rejected first.",
                    extra={"approval": describe(existing)},
                )
            return existing  # the same maker asking the same again: the same request
        raise ApprovalConflict(f"Requests for this {subject_type} keep changing: try again.")

    async def decide(
        self,
        session: AsyncSession,
        runtime: Runtime,
        checker_id: uuid.UUID,
        approval_id: uuid.UUID,
        *,
        approve: bool,
        reason: str | None = None,
        request_id: str | None = None,
    ) -> tuple[AdminApproval, bool]:
        """A second administrator approves (the action is carried out now, in this
        transaction: if it fails, nothing is decided) or rejects a pending request; audited.
        Deciding the same way twice returns it as is (and False)."""
        approval = await repository.approval_for_update(session, approval_id)
        if approval is None:
            raise ApprovalNotFound(f"no approval request {approval_id}")
        target = "approved" if approve else "rejected"
        if approval.status == target:
            return approval, False
        if approval.status != "pending":
            raise ApprovalAlreadyDecided(f"approval request {approval_id} is {approval.status}")
        if approval.maker_id == checker_id:
            raise OwnApproval("Four eyes: a different administrator must decide this request.")
        if await repository.is_expired(session, approval):
            approval.status = "expired"
            await session.flush()
            keep_on_error(session)
            raise ApprovalExpired(f"approval request {approval_id} expired unanswered")
        if approve:
            executor = self._executors.get(approval.action)
            if executor is None:  # a deployment that lost the code of an action it recorded
                raise ApprovalAlreadyDecided(f"nothing carries out {approval.action!r} here")
            approval.result = await executor(session, runtime, approval, checker_id, request_id)
        approval.status = target
        approval.checker_id = checker_id
        approval.decided_at = datetime.now(UTC)
        if reason is not None:
            approval.reason = reason
        await session.flush()
        await audit_service.record(
            session, checker_id,
            action="audit.approval.approve" if approve else "audit.approval.reject",
            subject_type="approval", subject_id=str(approval.id),
            before={"status": "pending", "maker_id": str(approval.maker_id)},
            after={"status": target, "action": approval.action,
                   "subject_id": approval.subject_id, "amount": approval.amount,
                   "reason": reason, "result": approval.result},
            request_id=request_id,
        )  # fmt: skip
        log.info("audit.approval.decided", approval_id=str(approval.id), status=target)
        return approval, True

    async def get(self, session: AsyncSession, approval_id: uuid.UUID) -> AdminApproval:
        found = await repository.approval(session, approval_id)
        if found is None:
            raise ApprovalNotFound(f"no approval request {approval_id}")
        return found

    async def page(
        self, session: AsyncSession, *, status: str, limit: int, cursor: str | None = None
    ) -> Slice[AdminApproval]:
        """Oldest first; ``pending``: those still answerable."""
        return await repository.approvals(session, status=status, limit=limit, cursor=cursor)


approvals = ApprovalService()
