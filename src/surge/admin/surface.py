"""The one admin surface: every ``/api/admin/*`` route is mounted here, behind one guard.

``install_admin(app, runtime)`` (called once by ``create_app``) includes, each with
``require_admin_mfa`` applied once:

- the admin domain's own routes (metrics, cache clearing) (the console, ``/admin``, is
  mounted by ``surge.admin.console.install_console``);
- each domain's ``admin_router`` listed in ``domain_admin_routers()``;
- the kit's admin pieces (jobs, circuit breakers, platform health), which expose router
  factories so the kit never knows about users.

A new domain declares ``admin_router = APIRouter(prefix="/api/admin", tags=[...])`` in its
``routes.py`` — no guard of its own needed — and adds it to ``domain_admin_routers()``
below (one import, one list entry). ``tests/admin/test_surface.py`` fails if an
``/api/admin`` route is mounted anywhere else; ``TestEveryAdminRoute`` (identity's tests)
if any answers without an admin session with MFA.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncSession

from surge.admin.routes import admin_router as admin_domain_router
from surge.admin.service import admin as admin_service
from surge.audit.routes import admin_router as audit_admin_router
from surge.credential.routes import admin_router as credential_admin_router
from surge.identity.deps import require_admin_mfa
from surge.identity.principal import Principal
from surge.identity.routes import admin_router as identity_admin_router
from surge.kit.breaker import breaker_router
from surge.kit.jobs.admin import admin_router as jobs_admin_router
from surge.kit.runtime import Runtime
from surge.kit.telemetry.health_score import platform_health_router
from surge.kit.web.deps import request_id
from surge.notifications.routes import admin_router as notifications_admin_router
from surge.operations.routes import admin_router as operations_admin_router
from surge.payments.routes import admin_router as payments_admin_router
from surge.wallet.routes import admin_router as wallet_admin_router

ADMIN_PREFIX = "/api/admin"


def domain_admin_routers() -> list[APIRouter]:
    """Every domain's admin router (a new domain adds its own here, and its import above)."""
    return [
        admin_domain_router,
        audit_admin_router,
        identity_admin_router,
        wallet_admin_router,
        # ---- new domains: one line each, below ----
        payments_admin_router,
        operations_admin_router,
        notifications_admin_router,
        credential_admin_router,  # ---- console: service API keys ----
    ]


async def record_job_action(
    request: Request, session: AsyncSession, action: str, job: dict[str, Any]
) -> None:
    """The kit jobs router's recorder: the admin the guard let in, audited."""
    principal = request.state.principal
    assert isinstance(principal, Principal)  # set by the guard, which ran first
    await admin_service.record_job_action(
        session, principal.user_id, action=action, job=job, request_id=request_id(request)
    )


def kit_admin_routers(runtime: Runtime) -> list[APIRouter]:
    """The kit's admin routers, built for this process (prefixes under ``/api/admin``)."""
    return [
        jobs_admin_router(prefix=f"{ADMIN_PREFIX}/jobs", record=record_job_action),
        breaker_router(prefix=f"{ADMIN_PREFIX}/circuit-breakers"),
        platform_health_router(
            runtime.health, runtime.extensions, path=f"{ADMIN_PREFIX}/platform-health"
        ),
    ]


def install_admin(app: FastAPI, runtime: Runtime) -> None:
    """Mount every admin route, each behind ``require_admin_mfa``."""
    guard = [Depends(require_admin_mfa)]
    for router in [*domain_admin_routers(), *kit_admin_routers(runtime)]:
        app.include_router(router, dependencies=guard)
