"""The worker's maintenance loop (its own module, as Prefect's server keeps its loops): stall
recovery, periodic (cron) jobs, queue gauges and pruning, every ``JOBS_STALLED_CHECK`` with
jitter so a fleet does not run them in step."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from surge.kit.db import Database
from surge.kit.jobs import metrics
from surge.kit.jobs._sql import (
    _PRUNE_DISPATCHES,
    _PRUNE_FINISHED,
    _SCHEDULE_ADVANCE,
    _SCHEDULE_DUE,
    _SCHEDULE_INSERT,
    _STALLED,
)
from surge.kit.jobs.config import WorkerConfig
from surge.kit.jobs.queue import enqueue, queue_stats
from surge.kit.jobs.registry import registered

log = structlog.get_logger()


class Maintenance:
    """Runs on every worker process; each step is safe to run concurrently on many (row
    locks with SKIP LOCKED, ON CONFLICT). ``wake`` is set when it re-queued jobs."""

    def __init__(
        self,
        db: Database,
        auto: AsyncEngine,
        config: WorkerConfig,
        wake: asyncio.Event,
        rng: random.Random,
    ) -> None:
        self.db = db
        self._auto = auto
        self.config = config
        self._wake = wake
        self._rng = rng

    async def run_forever(self) -> None:
        interval = self.config.stalled_check.total_seconds()
        ticks = 0
        while True:
            await asyncio.sleep(interval * (0.8 + 0.4 * self._rng.random()) if ticks else 0)
            ticks += 1
            for step in (self.recover_stalled, self.schedule_periodic, self.sample_gauges):
                try:
                    await step()
                except Exception as error:
                    log.warning("jobs.maintenance_failed", step=step.__name__,
                                error=str(error)[:200])  # fmt: skip
            if ticks % 20 == 1:
                try:
                    await self.prune()
                except Exception as error:
                    log.warning("jobs.prune_failed", error=str(error)[:200])

    async def recover_stalled(self) -> int:
        """Re-queue (or fail) every job whose lease expired; returns how many."""
        async with self._auto.connect() as conn:
            rows = (await conn.execute(_STALLED, {"max_stalled": self.config.max_stalled})).all()
        for job_id, name, queue, stalls, state, worker in rows:
            metrics.STALLED.labels(queue).inc()
            if state == "failed":
                metrics.FAILED.labels(queue).inc()
            log.warning("jobs.stalled", job_id=job_id, job=name, queue=queue, stalls=stalls,
                        action="failed" if state == "failed" else "requeued",
                        lost_worker=worker)  # fmt: skip
        if rows:
            self._wake.set()
        return len(rows)

    async def schedule_periodic(self) -> None:
        specs = [s for s in registered().values() if s.cron and s.queue in self.config.queues]
        if not specs:
            return
        now = datetime.now(UTC)
        async with self.db.session() as session:
            for spec in specs:
                first = spec.next_run(now - timedelta(minutes=1))
                await session.execute(_SCHEDULE_INSERT, {"name": spec.name, "at": first})
                slot = (
                    await session.execute(_SCHEDULE_DUE, {"name": spec.name})
                ).scalar_one_or_none()
                if slot is None:
                    continue
                following = spec.next_run(max(slot, now))
                await session.execute(_SCHEDULE_ADVANCE, {"name": spec.name, "at": following})
                job_id = await enqueue(
                    session, spec.name, {"scheduled_for": slot.isoformat()},
                    dedup_key=f"cron:{spec.name}:{slot.isoformat()}",
                )  # fmt: skip
                log.info("jobs.periodic.enqueued", job=spec.name, slot=slot.isoformat(),
                         job_id=job_id)  # fmt: skip

    async def sample_gauges(self) -> None:
        async with self.db.session() as session:
            stats = await queue_stats(session)
        seen = {s.queue for s in stats}
        for s in stats:
            metrics.DEPTH.labels(s.queue).set(s.ready)
            metrics.LAG.labels(s.queue).set(s.oldest_age_seconds)
        for queue in set(self.config.queues) - seen:
            metrics.DEPTH.labels(queue).set(0)
            metrics.LAG.labels(queue).set(0)

    async def prune(self) -> None:
        longest = max((r.period for r in self.config.rate_limits.values()), default=timedelta(0))
        async with self.db.primary.begin() as conn:
            await conn.execute(_PRUNE_DISPATCHES, {"secs": max(60.0, 2 * longest.total_seconds())})
            await conn.execute(_PRUNE_FINISHED, {"secs": self.config.retention.total_seconds()})
