"""``/api/admin/metrics`` and ``/api/admin/clear-cache``. Mounted with every other admin
route by ``surge.admin.surface``; the ``/admin`` console is ``surge.admin.console``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from surge.admin.service import admin as admin_service
from surge.identity.deps import AdminMfa
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep

admin_router = APIRouter(prefix="/api/admin", tags=["admin"])


@admin_router.get("/metrics", summary="Fleet metrics: health score, HTTP, DB, Redis, caches, jobs")
async def metrics(session: ReadSessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    return await admin_service.metrics(session, runtime)


@admin_router.post("/clear-cache", summary="Clear every cache namespace in every process (audited)")
async def clear_cache(
    request: Request, principal: AdminMfa, session: SessionDep, runtime: RuntimeDep
) -> dict[str, Any]:
    cleared = await admin_service.clear_caches(
        session,
        runtime,
        principal.user_id,
        request_id=getattr(request.state, "request_id", None),
    )
    return {"cleared": cleared}
