"""The console's charts: a small time series the API processes keep in Redis.

Every ``CONSOLE_SAMPLE_INTERVAL`` each API process records its own memory (a hash of live
processes), and one of them — whoever takes that interval's ``SET NX`` ticket — turns the
metrics registry (the host's aggregate in multiprocess mode) into one point: requests per
second, p50/p95/p99, error ratio, cache hit ratio per tier, DB pool use and waiters, queue
depth and lag (read from PostgreSQL), memory per process. Points go into a sorted set scored
by time and trimmed to ``CONSOLE_SERIES_RETENTION`` (one hour: 720 points at 5 s).

The same ticket holder evaluates the alert rules (``surge.kit.telemetry.alerts``, the same
thresholds as ``deploy/prometheus/alerts.yml``) over the interval and keeps their state and
a history of transitions for the console's alerts view.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import psutil
import structlog
from fastapi import FastAPI

from surge.kit.jobs.queue import queue_stats
from surge.kit.runtime import Runtime
from surge.kit.telemetry.alerts import (
    AlertEvaluator,
    AlertEvent,
    Snapshot,
    default_rules,
    delta,
    histogram_quantile,
    take_snapshot,
)
from surge.kit.telemetry.prometheus_rules import AlertThresholds

log = structlog.get_logger()

SERIES = "surge:console:series"
PROCESSES = "surge:console:processes"
TICKET = "surge:console:tick:"
ALERT_STATE = "surge:console:alerts:state"
ALERT_HISTORY = "surge:console:alerts:history"
HISTORY_KEEP = 200


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def measure(current: Snapshot, previous: Snapshot | None, seconds: float) -> dict[str, Any]:
    """One point's HTTP, cache and pool figures from two registry snapshots."""
    requests = delta(current, previous, "http_requests_total")
    errors = sum(
        max(
            0.0,
            value
            - (
                previous.values.get(("http_requests_total", frozenset(labels.items())), 0)
                if previous
                else value
            ),
        )
        for labels, value in current.select("http_requests_total")
        if labels.get("status", "").startswith("5")
    )
    buckets: dict[float, float] = {}
    for labels, value in current.select("http_request_duration_seconds_bucket"):
        le = float(labels["le"])
        before = 0.0
        if previous is not None:
            before = previous.values.get(
                ("http_request_duration_seconds_bucket", frozenset(labels.items())), 0.0
            )
        else:
            before = value
        buckets[le] = buckets.get(le, 0.0) + max(0.0, value - before)

    def ms(q: float) -> float | None:
        value = histogram_quantile(q, buckets)
        return round(value * 1000, 2) if value is not None else None

    tiers = {}
    for tier in ("l1", "l2"):
        hits = delta(current, previous, "cache_hits_total", tier=tier)
        misses = delta(current, previous, "cache_misses_total", tier=tier)
        tiers[tier] = _ratio(hits, hits + misses)
    return {
        "rps": round(requests / seconds, 3) if seconds > 0 else 0.0,
        "p50_ms": ms(0.5),
        "p95_ms": ms(0.95),
        "p99_ms": ms(0.99),
        "error_ratio": _ratio(errors, requests),
        "hit_l1": tiers["l1"],
        "hit_l2": tiers["l2"],
        "pool_in_use": current.total("db_pool_checked_out"),
        "pool_size": current.total("db_pool_connections"),
        "pool_waiting": current.total("db_pool_waiting"),
    }


class Sampler:
    """Records this process's point every ``interval`` (see module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.interval = settings.CONSOLE_SAMPLE_INTERVAL.total_seconds()
        self.retention = settings.CONSOLE_SERIES_RETENTION.total_seconds()
        self.origin = f"{socket.gethostname()}:{os.getpid()}"
        self._process = psutil.Process()
        self._previous: Snapshot | None = None
        self._task: asyncio.Task[None] | None = None
        self.alerts = AlertEvaluator(
            default_rules(thresholds=AlertThresholds.from_settings(settings)),
            self._record_alert,
            cooldown=settings.ALERT_COOLDOWN.total_seconds(),
        )

    async def _record_alert(self, event: AlertEvent) -> None:
        entry = {
            "at": event.at.isoformat(),
            "rule": event.rule.name,
            "status": event.status,
            "value": event.value,
            "detail": event.detail,
            "severity": event.rule.severity,
        }
        async with self.runtime.redis.guard() as redis:
            await redis.lpush(ALERT_HISTORY, orjson.dumps(entry))
            await redis.ltrim(ALERT_HISTORY, 0, HISTORY_KEEP - 1)

    async def sample(self, *, now: float | None = None) -> dict[str, Any] | None:
        """One round: this process's memory; the point if this process holds the ticket."""
        now = time.time() if now is None else now
        current = take_snapshot()
        previous, self._previous = self._previous, current
        rss = self._process.memory_info().rss
        bucket = int(now // self.interval)
        async with self.runtime.redis.guard() as redis:
            await redis.hset(
                PROCESSES, self.origin, orjson.dumps({"rss": rss, "at": now, "pid": os.getpid()})
            )
            won = await redis.set(
                f"{TICKET}{bucket}", self.origin, nx=True, ex=max(2, int(self.interval * 3))
            )
            if not won:
                return None
            point: dict[str, Any] = {"t": round(now, 3)}
            point.update(measure(current, previous, self.interval))
            memory = {}
            for origin, raw in (await redis.hgetall(PROCESSES)).items():
                item = orjson.loads(raw)
                if now - float(item["at"]) <= 3 * self.interval:
                    memory[origin.decode() if isinstance(origin, bytes) else origin] = item["rss"]
                else:
                    await redis.hdel(PROCESSES, origin)
            point["memory"] = memory
            async with self.runtime.db.read_session() as session:
                stats = await queue_stats(session)
            point["queue_depth"] = sum(s.ready for s in stats)
            point["queue_lag_s"] = round(max((s.oldest_age_seconds for s in stats), default=0), 2)
            await redis.zadd(SERIES, {orjson.dumps(point): now})
            await redis.zremrangebyscore(SERIES, "-inf", now - self.retention)
        await self._evaluate(current, previous)
        return point

    async def _evaluate(self, current: Snapshot, previous: Snapshot | None) -> None:
        self.alerts._snapshot = lambda: current  # the same snapshot as the point
        self.alerts._previous = previous
        await self.alerts.evaluate()
        state = {
            rule.name: orjson.dumps(
                {
                    "firing": self.alerts.states[rule.name].firing,
                    "value": self.alerts.states[rule.name].value,
                    "detail": self.alerts.states[rule.name].detail,
                    "threshold": rule.threshold,
                    "unit": rule.unit,
                    "summary": rule.summary,
                    "severity": rule.severity,
                }
            )
            for rule in self.alerts.rules
        }
        async with self.runtime.redis.guard() as redis:
            await redis.hset(ALERT_STATE, mapping=state)  # type: ignore[arg-type]

    async def _run(self) -> None:
        self._previous = take_snapshot()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sample()
            except Exception as error:  # Redis or PostgreSQL away: the next round retries
                log.warning("console.sample_failed", error=type(error).__name__)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="console")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None


async def read_series(runtime: Runtime, *, since: float) -> list[dict[str, Any]]:
    async with runtime.redis.guard() as redis:
        raw = await redis.zrangebyscore(SERIES, since, "+inf")
    return [orjson.loads(item) for item in raw if isinstance(item, bytes | str)]


async def read_alerts(runtime: Runtime) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with runtime.redis.guard() as redis:
        state = await redis.hgetall(ALERT_STATE)
        history = await redis.lrange(ALERT_HISTORY, 0, HISTORY_KEEP - 1)
    decoded = {
        (k.decode() if isinstance(k, bytes) else k): orjson.loads(v) for k, v in state.items()
    }
    return decoded, [orjson.loads(item) for item in history]


def sampler(runtime: Runtime) -> Sampler:
    found = runtime.extensions.get("console.sampler")
    if not isinstance(found, Sampler):
        found = runtime.extensions["console.sampler"] = Sampler(runtime)
    return found


def run_sampler_with(app: FastAPI, runtime: Runtime) -> None:
    """Start the sampler after the app's own start-up and stop it before its shutdown."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
        async with inner(app_) as state:
            sampler(runtime).start()
            try:
                yield state
            finally:
                await sampler(runtime).close()

    app.router.lifespan_context = lifespan
