"""``create_app()``: lifespan, middleware order, routers, error handlers.

Run by ``surge serve`` / ``surge up`` (uvicorn, N processes, factory mode). Each process builds
its own ``Runtime`` (pools, Redis client) in the lifespan, after the fork.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import structlog
from fastapi import FastAPI

from surge import __version__
from surge.admin.console import install_console
from surge.admin.console.ratelimit import console_subject
from surge.admin.surface import install_admin
from surge.config import Settings
from surge.config import settings as default_settings
from surge.identity.contract import install_auth_before_body
from surge.identity.hook import RateLimitHook
from surge.identity.routes import install_routes as install_identity_routes
from surge.identity.runtime import install_identity
from surge.kit.health import Health, install_health_routes
from surge.kit.ratelimit import install_ratelimit
from surge.kit.runtime import Runtime
from surge.kit.telemetry.gc import tune as tune_gc
from surge.kit.telemetry.logging import configure_logging
from surge.kit.web.docs import install_docs
from surge.kit.web.openapi import install_contract
from surge.kit.web.problem import install_problem_handlers
from surge.kit.web.routing import promote_routes
from surge.kit.web.stack import install_stack
from surge.notifications.routes import router as notifications_router
from surge.operations.routes import page_router as operations_page_router
from surge.operations.routes import router as operations_router
from surge.payments.routes import router as payments_router
from surge.wallet.routes import api_constraints
from surge.wallet.routes import router as wallet_router
from surge.worker import discover as discover_jobs

log = structlog.get_logger()

#: Matched first, in this order: the API's hottest route (seed 003's privilege check), then
#: the probes load balancers send to every process every few seconds.
HOT_ROUTES = ("/api/v1/me/privileges", "/livez", "/readyz")


def _drain_on_signal(health: Health) -> None:
    """Flip ``/readyz`` to 503 the moment SIGTERM/SIGINT arrives, then let uvicorn drain.

    uvicorn installs its own handlers before the lifespan starts; we wrap them."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(
            signum: int, frame: FrameType | None, _prev: Callable[..., Any] = previous
        ) -> None:
            health.draining = True
            _prev(signum, frame)

        signal.signal(sig, handler)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or default_settings
    # Engines and clients connect lazily: building them here, in the worker process that
    # uvicorn spawned, is safe; the lifespan opens the connections.
    runtime = Runtime(settings)
    discover_jobs(settings)  # enqueue() needs every job's queue and options
    identity = install_identity(runtime)  # per-process identity state, on the runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.LOG_LEVEL, settings.LOG_JSON)
        await runtime.start()
        await identity.start()
        _drain_on_signal(runtime.health)
        # Everything allocated so far lives as long as the process: move it out of the
        # garbage collector's sight, so collections during requests scan only request
        # garbage (the Instagram gc.freeze trick; measured by bench ping).
        gc.collect()
        gc.freeze()
        # And far fewer collections from here on: each full one walks every cached entry
        # with the event loop stopped (ADR 0041); their time is in process_gc_seconds_total.
        tune_gc(settings.GC_THRESHOLDS)
        runtime.health.started = True
        log.info("api.started", version=__version__)
        try:
            yield
        finally:
            runtime.health.draining = True
            await runtime.stop()
            log.info("api.stopped")

    app = FastAPI(
        title="Surge",
        version=__version__,
        summary="Backend platform: identity, wallet, operations, payments, notifications.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets below (install_docs): no CDN
        redoc_url=None,
        telemetry={
            "tracing": settings.OTEL_ENABLED,
            "metrics": settings.OTEL_ENABLED,
            "logs": settings.OTEL_ENABLED,
        },
    )
    app.state.runtime = runtime
    install_problem_handlers(app)
    install_health_routes(app, runtime.health)
    install_identity_routes(app)
    app.include_router(wallet_router)
    # Every /api/admin route, each behind require_admin_mfa once (surge.admin.surface).
    install_admin(app, runtime)
    app.include_router(payments_router)  # ---- payments ----
    app.include_router(operations_router)  # ---- operations (admin: surge.admin.surface) ----
    app.include_router(operations_page_router)  # /panel
    app.include_router(notifications_router)  # ---- notifications (admin: surge.admin.surface) ----
    # ---- console (issue 16): an honest contract, local docs --------------------------------
    install_docs(app)
    install_console(app, runtime)  # /admin: the operator's console
    install_contract(app, constraints=api_constraints(settings))
    install_auth_before_body(app)
    # ---- end console ----------------------------------------------------------------------
    # The routes most requests hit go first: Starlette tries routes in order (ADR 0011).
    promote_routes(app, HOT_ROUTES)
    # Added before SurgeMiddleware so it runs inside it: 429s get request ids and metrics.
    install_ratelimit(app, runtime)
    # The caller's plan picks its rate-limit tier (identity's hook, a bearer token or a
    # console session cookie; anonymous otherwise: ADR 0054).
    rate_hook = RateLimitHook(identity)
    rate_hook.otherwise = console_subject(runtime, rate_hook)
    runtime.extensions["ratelimit"].identify = rate_hook.subject
    # The one layer around everything (ADR 0029): admission control first (issue 19, ADR
    # 0016: shed what cannot be served in time before any other work; health, readiness and
    # /metrics are exempt), then request id, body limit, timeout, metrics, Server-Timing and
    # the exception handlers; FastAPI's own wrapping layers are left out (kit.web.stack).
    install_stack(
        app,
        otel=settings.OTEL_ENABLED,
        admission={
            "max_in_flight": settings.HTTP_MAX_IN_FLIGHT,
            "patience": settings.HTTP_QUEUE_PATIENCE.total_seconds(),
            "retry_after": settings.HTTP_SHED_RETRY_AFTER,
        },
        body_limit=settings.REQUEST_BODY_LIMIT,
        timeout=settings.REQUEST_TIMEOUT.total_seconds(),
        slow_request=settings.SLOW_REQUEST.total_seconds(),
        access_log=settings.LOG_ACCESS,
        server_timing=settings.HTTP_SERVER_TIMING,
    )
    return app
