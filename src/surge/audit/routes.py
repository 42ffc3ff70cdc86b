"""``GET /api/admin/audit-log`` (mounted by ``surge.admin.surface`` behind the admin guard)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from surge.audit.schemas import AuditRead
from surge.audit.service import audit as audit_service
from surge.kit.web.deps import ReadSessionDep
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
