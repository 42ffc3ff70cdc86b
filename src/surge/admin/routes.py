"""``/api/admin/metrics``, ``/api/admin/clear-cache`` and the ``/admin`` page. Mounted with
every other admin route by ``surge.admin.surface``."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from surge.admin.service import admin as admin_service
from surge.identity.deps import AdminMfa
from surge.kit.web.deps import ReadSessionDep, RuntimeDep, SessionDep

admin_router = APIRouter(prefix="/api/admin", tags=["admin"])
page_router = APIRouter(tags=["admin"])


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


@page_router.get("/admin", include_in_schema=False)
async def dashboard() -> Response:
    """The console page. It holds no data: it signs in and calls the admin API like any
    client (access token in memory only, MFA required)."""
    html = resources.files("surge.admin").joinpath("static/dashboard.html").read_bytes()
    return Response(
        html,
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'self' 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
        },
    )
