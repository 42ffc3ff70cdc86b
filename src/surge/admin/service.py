"""The admin console's reads and actions (seed 002 admin endpoints, seed 004 audit).

Metrics are read from the Prometheus registry (aggregated over every API process in
multiprocess mode), so the console shows the fleet of this host, not one process. Actions
that change state (clearing caches) are audited (``surge.audit``).

    from surge.admin.service import admin as admin_service

No errors of its own.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.audit.service import audit as audit_service
from surge.identity.service import identity as identity_service
from surge.kit.breaker import breakers
from surge.kit.jobs import queue_stats, registered
from surge.kit.runtime import Runtime
from surge.kit.telemetry.alerts import AlertEvaluator, Snapshot, histogram_quantile, take_snapshot
from surge.kit.telemetry.health_score import platform_health

log = structlog.get_logger()

ACTIVE_WINDOW = timedelta(minutes=15)


def _http(snapshot: Snapshot) -> dict[str, Any]:
    requests = snapshot.total("http_requests_total")
    errors = sum(
        value
        for labels, value in snapshot.select("http_requests_total")
        if labels.get("status", "").startswith("5")
    )
    buckets: dict[float, float] = {}
    for labels, value in snapshot.select("http_request_duration_seconds_bucket"):
        bound = float(labels["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value

    def quantile_ms(q: float) -> float | None:
        value = histogram_quantile(q, buckets)
        return None if value is None else round(value * 1000, 2)

    return {
        "requests": int(requests),
        "server_errors": int(errors),
        "error_rate": round(errors / requests, 5) if requests else 0.0,
        "p50_ms": quantile_ms(0.5),
        "p95_ms": quantile_ms(0.95),
        "p99_ms": quantile_ms(0.99),
        "in_flight": int(snapshot.total("http_requests_in_flight")),
    }


def _database(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "pool_connections": int(snapshot.total("db_pool_connections")),
        "checked_out": int(snapshot.total("db_pool_checked_out")),
        "waiting": int(snapshot.total("db_pool_waiting")),
        "slow_queries": int(snapshot.total("db_slow_queries_total")),
        "slowest_query_ms": round(snapshot.total("db_query_max_seconds") * 1000, 1),
        "replica_fallbacks": int(snapshot.total("db_replica_fallbacks_total")),
    }


def _memory(snapshot: Snapshot) -> dict[str, Any]:
    rss = [value for _, value in snapshot.select("surge_process_resident_memory_bytes")]
    return {
        "processes": len(rss),
        "rss_bytes_total": int(sum(rss)),
        "system_used_ratio": round(snapshot.total("surge_system_memory_used_ratio"), 4),
    }


class AdminService:
    """Stateless; see the module docstring."""

    async def metrics(self, session: AsyncSession, runtime: Runtime) -> dict[str, Any]:
        """One JSON view of what an operator checks first."""
        started = time.perf_counter()
        snapshot = take_snapshot()
        alerts = runtime.extensions.get("alerts")
        health = await platform_health(
            health=runtime.health,
            alerts=alerts if isinstance(alerts, AlertEvaluator) else None,
        )
        # Every registered queue, idle ones too (zeros), not only the queues with work.
        queues = await queue_stats(session, known={spec.queue for spec in registered().values()})
        active = await identity_service.active_users(session, within=ACTIVE_WINDOW)
        return {
            "generated_at": datetime.now(UTC).isoformat(),
            "health": health,
            "http": _http(snapshot),
            "database": _database(snapshot),
            "redis": {"up": runtime.redis.is_up},
            "memory": _memory(snapshot),
            "caches": [runtime.cache.stats(), identity_service.privilege_cache_stats(runtime)],
            "jobs": [queue.__dict__ for queue in queues],
            "breakers": breakers.status(),
            "active_users_15m": active,
            "took_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    async def clear_caches(
        self,
        session: AsyncSession,
        runtime: Runtime,
        actor_id: Any,
        *,
        request_id: str | None = None,
    ) -> list[str]:
        """Seed 002 "cache clear": every cache namespace, in every process, audited."""
        await runtime.cache.clear()
        cleared = [
            str(runtime.cache.stats()["name"]),
            await identity_service.clear_privilege_cache(runtime),
        ]
        await audit_service.record(
            session,
            actor_id,
            action="admin.cache.cleared",
            subject_type="cache",
            subject_id="*",
            after={"caches": cleared},
            request_id=request_id,
        )
        log.info("admin.cache.cleared", caches=cleared)
        return cleared

    async def record_job_action(
        self,
        session: AsyncSession,
        actor_id: Any,
        *,
        action: str,
        job: dict[str, Any],
        request_id: str | None = None,
    ) -> None:
        """Audit a job retried or cancelled through ``/api/admin/jobs`` (the kit's router
        calls this through ``surge.admin.surface``): which job, what it is about (its name
        and keys, e.g. ``earnings:<event>:`` or ``payment:<pi>``), its state now — not its
        payload, which may carry a mail's context. The console's job actions are audited by
        its own service."""
        await audit_service.record(
            session, actor_id, action=action, subject_type="job", subject_id=str(job["id"]),
            after={
                "name": job["name"], "queue": job["queue"], "state": job["state"],
                "dedup_key": job["dedup_key"], "lock_key": job["lock_key"],
            },
            request_id=request_id,
        )  # fmt: skip


admin = AdminService()
