"""One admin surface (ADR 0014): every ``/api/admin`` route of the app is mounted by
``surge.admin.surface``; none is added around it. (That each one refuses callers without an
admin session with MFA is ``tests/identity/test_auth.py::TestEveryAdminRoute``.)"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from surge.admin.surface import domain_admin_routers, kit_admin_routers


def _paths(routers: list[APIRouter]) -> set[str]:
    found: set[str] = set()
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute):
                found |= {f"{method} {route.path}" for method in route.methods or ()}
    return found


def test_every_admin_route_comes_from_the_surface(id_app: FastAPI) -> None:
    runtime = id_app.state.runtime
    mounted = _paths([*domain_admin_routers(), *kit_admin_routers(runtime)])
    served = {
        f"{method.upper()} {path}"
        for path, operations in id_app.openapi()["paths"].items()
        if path.startswith("/api/admin")
        for method in operations
    }
    assert served, "no admin route at all"
    assert served <= mounted, f"mounted outside surge.admin.surface: {sorted(served - mounted)}"
    assert "GET /api/admin/audit-log" in served
    assert "GET /api/admin/jobs" in served


def test_every_surface_router_is_under_the_admin_prefix(id_app: FastAPI) -> None:
    paths = _paths([*domain_admin_routers(), *kit_admin_routers(id_app.state.runtime)])
    assert all(p.split(" ", 1)[1].startswith("/api/admin/") for p in paths), sorted(paths)
