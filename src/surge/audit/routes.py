"""``GET /api/admin/audit-log`` and the four-eyes requests, ``/api/admin/approvals``
(ADR 0059), mounted by ``surge.admin.surface`` behind the admin guard."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Request

from surge.audit.approvals import approvals
from surge.audit.schemas import ApprovalDecision, ApprovalRead, AuditRead
from surge.audit.service import audit as audit_service
from surge.identity.deps import AdminMfa
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep, request_id
from surge.kit.web.pagination import Cursor, Limit, Page

admin_router = APIRouter(prefix="/api/admin", tags=["admin"])


@admin_router.get("/audit-log")
async def audit_log(
    session: ReadSessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    subject_type: Annotated[str | None, Query(max_length=100)] = None,
    subject_id: Annotated[str | None, Query(max_length=200)] = None,
) -> Page[AuditRead]:
    """Newest first; ``subject_type``/``subject_id`` narrow it to one subject's history."""
    found = await audit_service.page(
        session, subject_type=subject_type, subject_id=subject_id, limit=limit, cursor=cursor
    )
    return Page[AuditRead](
        items=[AuditRead.model_validate(row) for row in found.items],
        next_cursor=found.next_cursor,
    )


# ---- four-eyes requests (ADR 0059) --------------------------------------------------------
@admin_router.get("/approvals")
async def list_approvals(
    session: ReadSessionDep,
    status: Literal["pending", "approved", "rejected", "expired"] = "pending",
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[ApprovalRead]:
    """Money actions waiting for (or decided by) a second administrator, oldest first."""
    found = await approvals.page(session, status=status, limit=limit, cursor=cursor)
    return Page[ApprovalRead](
        items=[ApprovalRead.model_validate(row) for row in found.items],
        next_cursor=found.next_cursor,
    )


@admin_router.get("/approvals/{approval_id}")
async def get_approval(approval_id: UUID, session: ReadSessionDep) -> ApprovalRead:
    return ApprovalRead.model_validate(await approvals.get(session, approval_id))


@admin_router.post("/approvals/{approval_id}/approve")
async def approve(
    approval_id: UUID,
    *,
    admin: AdminMfa,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
    body: ApprovalDecision | None = None,
) -> ApprovalRead:
    """Carry the request out now, as the second administrator (never its maker: 403)."""
    found, _ = await approvals.decide(
        session, runtime, admin.user_id, approval_id, approve=True,
        reason=body.reason if body else None, request_id=request_id(request),
    )  # fmt: skip
    return ApprovalRead.model_validate(found)


@admin_router.post("/approvals/{approval_id}/reject")
async def reject(
    approval_id: UUID,
    *,
    admin: AdminMfa,
    session: SessionDep,
    runtime: RuntimeDep,
    request: Request,
    body: ApprovalDecision | None = None,
) -> ApprovalRead:
    """Refuse the request: nothing happens (never its maker: 403)."""
    found, _ = await approvals.decide(
        session, runtime, admin.user_id, approval_id, approve=False,
        reason=body.reason if body else None, request_id=request_id(request),
    )  # fmt: skip
    return ApprovalRead.model_validate(found)
