"""Rate limits: tiered per-caller, per-IP and per-endpoint limits in one Redis round trip.

    from surge.kit.ratelimit import RouteLimit

    @router.post("/exports", dependencies=[Depends(RouteLimit("expensive-10-per-hour"))])
    async def export(...): ...

Policies come from configuration (``SURGE_RATELIMIT_POLICIES``); ``install_ratelimit``
builds the process's ``RateLimiter`` (``runtime.extensions["ratelimit"]``) and adds the
global middleware. See ``limiter`` for the algorithm and ADR 0006 for the decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from surge.kit.ratelimit.limiter import (
    Check,
    Decision,
    KeyState,
    LocalStore,
    RateLimiter,
    RateLimitError,
    Verdict,
)
from surge.kit.ratelimit.policy import (
    ANONYMOUS,
    Failure,
    Identify,
    Per,
    RatePolicy,
    Subject,
    parse_policies,
    subject_from_state,
    with_constant_routes,
)
from surge.kit.ratelimit.web import (
    MemoClientIp,
    RateLimitMiddleware,
    RouteLimit,
    rate_limit_headers,
)
from surge.kit.web.client_ip import ClientIpResolver

if TYPE_CHECKING:
    from fastapi import FastAPI

    from surge.config import Settings
    from surge.kit.redis import RedisGateway
    from surge.kit.runtime import Runtime


def build_limiter(settings: Settings, gateway: RedisGateway) -> RateLimiter:
    """The limiter ``settings`` describe (policies validated here: a typo fails start-up)."""
    processes = settings.RATELIMIT_LOCAL_PROCESSES or settings.WEB_WORKERS
    return RateLimiter(
        gateway,
        parse_policies(
            with_constant_routes(settings.RATELIMIT_POLICIES, settings.RATELIMIT_STATIC_ROUTES)
        ),
        prefix=settings.RATELIMIT_KEY_PREFIX,
        local_processes=processes,
        client_ip=MemoClientIp(settings.TRUSTED_PROXIES),
        lease=settings.RATELIMIT_LEASE,
    )


def install_ratelimit(app: FastAPI, runtime: Runtime) -> RateLimiter:
    """Register the limiter as ``runtime.extensions["ratelimit"]`` and, when enabled, add the
    global middleware. Call it *before* adding ``SurgeMiddleware`` so that the limiter runs
    inside it (429s get a request id and RED metrics)."""
    settings = runtime.settings
    limiter = build_limiter(settings, runtime.redis)
    runtime.extensions["ratelimit"] = limiter
    if settings.RATELIMIT_ENABLED:
        app.add_middleware(
            RateLimitMiddleware, limiter=limiter, exempt_paths=settings.RATELIMIT_EXEMPT_PATHS
        )
    return limiter


__all__ = [
    "ANONYMOUS",
    "Check",
    "ClientIpResolver",
    "Decision",
    "Failure",
    "Identify",
    "KeyState",
    "LocalStore",
    "MemoClientIp",
    "Per",
    "RateLimitError",
    "RateLimitMiddleware",
    "RateLimiter",
    "RatePolicy",
    "RouteLimit",
    "Subject",
    "Verdict",
    "build_limiter",
    "install_ratelimit",
    "parse_policies",
    "rate_limit_headers",
    "subject_from_state",
    "with_constant_routes",
]
