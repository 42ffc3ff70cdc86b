"""``GET /api/admin/jobs`` (per-queue stats, recent failures), ``GET /api/admin/jobs/{id}``,
``POST /api/admin/jobs/{id}/retry`` and ``.../cancel``.

``admin_router(dependencies=[...], record=...)``: the application passes its admin guard
(identity's admin + MFA dependency) and its audit recorder, so the kit stays free of any user
model. A retry or a cancel changes what the workers will do — a cancelled job that would
have applied a payment's chargeback is money — so each is recorded in the request's own
transaction, like the console's job actions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.params import Depends
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.jobs.errors import JobNotFound, JobStateConflict
from surge.kit.jobs.queue import (
    cancel_job,
    finished_counts,
    get_job,
    queue_stats,
    recent_failures,
    retry_job,
)
from surge.kit.web.deps import ReadSessionDep, SessionDep

JobId = Annotated[int, Path(ge=1, le=2**63 - 1, description="A job's id (BIGINT).")]

#: ``record(request, session, action, job)``: the application's audit of a job action
#: (``action`` is ``jobs.job.retry`` or ``jobs.job.cancel``; ``job`` the job as it is now).
Recorder = Callable[[Request, AsyncSession, str, dict[str, Any]], Awaitable[None]]


async def _unrecorded(
    request: Request, session: AsyncSession, action: str, job: dict[str, Any]
) -> None:
    return None


def admin_router(
    *,
    prefix: str = "/api/admin/jobs",
    dependencies: Sequence[Depends] = (),
    record: Recorder = _unrecorded,
) -> APIRouter:
    """The jobs admin API; every route runs ``dependencies`` first (the admin guard), and
    every change is passed to ``record`` in the request's transaction."""
    router = APIRouter(prefix=prefix, tags=["admin"], dependencies=list(dependencies))

    @router.get("")
    async def jobs_overview(
        session: ReadSessionDep, failures: int = Query(default=20, ge=0, le=100)
    ) -> dict[str, Any]:
        """Per-queue depth, lag, running and the last hour's outcomes; the newest failures."""
        stats = {s.queue: dict(s.__dict__) for s in await queue_stats(session)}
        for queue, counts in (await finished_counts(session, since=timedelta(hours=1))).items():
            entry = stats.setdefault(
                queue,
                {"queue": queue, "ready": 0, "scheduled": 0, "active": 0,
                 "oldest_age_seconds": 0.0},
            )  # fmt: skip
            entry["last_hour"] = {k: v for k, v in counts.items() if k != "failed_total"}
            entry["failed_retained"] = counts.get("failed_total", 0)
        return {
            "queues": sorted(stats.values(), key=lambda e: e["queue"]),
            "recent_failures": [
                {
                    "id": job.id,
                    "name": job.name,
                    "queue": job.queue,
                    "attempts": job.attempts,
                    "stalls": job.stalls,
                    "finished_at": job.finished_at,
                    "last_error": (job.last_error or "")[:1000],
                }
                for job in await recent_failures(session, limit=failures)
            ],
        }

    @router.get("/{job_id}")
    async def job_detail(job_id: JobId, session: ReadSessionDep) -> dict[str, Any]:
        """One job's state (queued / active / succeeded / failed / cancelled) and history."""
        job = await get_job(session, job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return job.as_dict()

    @router.post("/{job_id}/retry")
    async def job_retry(job_id: JobId, session: SessionDep, request: Request) -> dict[str, Any]:
        """Re-queue a failed or cancelled job now, with its attempts reset."""
        job = (await retry_job(session, job_id)).as_dict()
        await record(request, session, "jobs.job.retry", job)
        return job

    @router.post("/{job_id}/cancel")
    async def job_cancel(job_id: JobId, session: SessionDep, request: Request) -> dict[str, Any]:
        """Cancel a job that has not started yet."""
        if not await cancel_job(session, job_id):
            job = await get_job(session, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            raise JobStateConflict(f"job {job_id} is {job.state}; only queued jobs cancel")
        job = await get_job(session, job_id)
        assert job is not None
        await record(request, session, "jobs.job.cancel", job.as_dict())
        return job.as_dict()

    return router
