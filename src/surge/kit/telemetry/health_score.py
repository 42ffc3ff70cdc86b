"""Platform health score (seed 002 ``getPlatformHealth``): 0-100 plus the issues lowering it.

One number for a dashboard tile, explained by its list of issues so nobody has to guess why it
is 55. Penalties (a start, tune them with incidents):

    dependency check failing      database 40, redis 20, any other 15
    circuit breaker               open 15, half-open 5
    alert firing                  critical 20, warning 10
    memory (only when no alert    > 90 % 10
    evaluator is running)

The score is ``max(0, 100 - sum)``; ``healthy`` from 90, ``degraded`` from 60, ``critical``
below. ``GET /api/admin/platform-health`` serves it (``platform_health_router``). It never
feeds readiness: an open breaker must not take processes out of the load
balancer (spring-boot#15479), it only tells people where to look.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil
from fastapi import APIRouter, params

from surge.kit.breaker import BreakerRegistry, BreakerState
from surge.kit.breaker import breakers as default_breakers
from surge.kit.health import Health
from surge.kit.telemetry.alerts import AlertEvaluator

DEPENDENCY_PENALTY = {"database": 40, "redis": 20}
OTHER_DEPENDENCY_PENALTY = 15
BREAKER_PENALTY = {BreakerState.OPEN: 15, BreakerState.HALF_OPEN: 5}
ALERT_PENALTY = {"critical": 20, "warning": 10}
MEMORY_PENALTY = 10


@dataclass(frozen=True)
class Issue:
    source: str  # dependency | breaker | alert | memory
    name: str
    detail: str
    penalty: int


def status_for(score: int) -> str:
    if score >= 90:
        return "healthy"
    if score >= 60:
        return "degraded"
    return "critical"


async def platform_health(
    *,
    health: Health | None = None,
    breakers: BreakerRegistry | None = None,
    alerts: AlertEvaluator | None = None,
    memory_threshold: float = 0.9,
) -> dict[str, Any]:
    """The score, its status and the issues, worst first."""
    issues: list[Issue] = []
    if health is not None:
        for name, result in (await health.run()).items():
            if not result.ok:
                penalty = DEPENDENCY_PENALTY.get(name, OTHER_DEPENDENCY_PENALTY)
                issues.append(Issue("dependency", name, result.error or "unavailable", penalty))
    for breaker in breakers if breakers is not None else default_breakers:
        state = breaker.state
        if state in BREAKER_PENALTY:
            detail = f"{state.value}; last error: {breaker.last_error or 'n/a'}"
            issues.append(Issue("breaker", breaker.name, detail, BREAKER_PENALTY[state]))
    if alerts is not None:
        for rule, rule_state in alerts.firing():
            if rule.name == "CircuitBreakerOpen":
                continue  # already counted breaker by breaker
            penalty = ALERT_PENALTY.get(rule.severity, 10)
            issues.append(Issue("alert", rule.name, rule_state.detail, penalty))
    else:
        ratio = psutil.virtual_memory().percent / 100
        if ratio > memory_threshold:
            issues.append(Issue("memory", "memory", f"{ratio:.0%} in use", MEMORY_PENALTY))
    issues.sort(key=lambda issue: -issue.penalty)
    score = max(0, 100 - sum(issue.penalty for issue in issues))
    return {
        "score": score,
        "status": status_for(score),
        "issues": [issue.__dict__ for issue in issues],
    }


def platform_health_router(
    health: Health,
    extensions: Mapping[str, Any],
    *,
    path: str = "/api/admin/platform-health",
    dependencies: list[params.Depends] | None = None,
) -> APIRouter:
    """``GET {path}``: the score, its status and its issues. ``extensions`` is the runtime's
    (the alert evaluator, when running, is ``extensions["alerts"]``); ``dependencies`` carries
    the app's admin guard."""
    router = APIRouter(tags=["admin"], dependencies=dependencies or [])

    @router.get(path)
    async def get_platform_health() -> dict[str, Any]:
        alerts = extensions.get("alerts")
        return await platform_health(
            health=health, alerts=alerts if isinstance(alerts, AlertEvaluator) else None
        )

    return router
