"""``/api/admin/metrics`` and ``/api/admin/clear-cache`` (the ``/admin`` console is
``surge.admin.console``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from surge.admin.service import admin as admin_service
from surge.identity.deps import AdminMfa, IdentityDep, require_admin_mfa
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep

router = APIRouter(prefix="/api/admin", tags=["admin"], dependencies=[Depends(require_admin_mfa)])


@router.get("/metrics", summary="Fleet metrics: health score, HTTP, DB, Redis, caches, jobs")
async def metrics(
    session: ReadSessionDep, runtime: RuntimeDep, identity: IdentityDep
) -> dict[str, Any]:
    return await admin_service.metrics(session, runtime, identity)


@router.post("/clear-cache", summary="Clear every cache namespace in every process (audited)")
async def clear_cache(
    request: Request,
    principal: AdminMfa,
    session: SessionDep,
    runtime: RuntimeDep,
    identity: IdentityDep,
) -> dict[str, Any]:
    cleared = await admin_service.clear_caches(
        session,
        principal.user_id,
        runtime,
        identity,
        request_id=getattr(request.state, "request_id", None),
    )
    return {"cleared": cleared}
