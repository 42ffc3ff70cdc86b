"""Durable jobs in PostgreSQL: transactional enqueue, leases with fencing, stalled-job
recovery, retries with backoff, a global per-queue rate limit, a worker fleet (ADR 0007).

Register (in ``surge/<domain>/jobs.py``; ``surge.worker`` imports every such module)::

    from surge.kit.jobs import JobContext, job

    @job("billing.invoice.issue", queue="billing", max_attempts=5, backoff=timedelta(seconds=2))
    async def issue_invoices(ctx: JobContext) -> None:
        for account_id in ctx.payload["items"]:
            await billing_service.issue(ctx.session, account_id, ...)   # flush, never commit

Enqueue, inside the caller's open transaction (same connection; rollback = no job)::

    from surge.kit.jobs import enqueue, enqueue_batches

    async with db.session() as session:                 # or a request's SessionDep
        session.add(revenue_event)
        await enqueue(session, "notifications.email.send", {"to": ...},
                      dedup_key=f"welcome:{user_id}",    # one waiting/running job per key
                      lock_key=f"account:{account_id}",  # one running job per key
                      delay=timedelta(minutes=5), priority=10)
        await enqueue_batches(session, "billing.invoice.issue", account_ids, batch_size=50,
                              dedup_prefix=f"event:{event_id}")

Run: ``surge worker --processes 8 --concurrency 8 --queues billing,email``.

Semantics (the guarantees, and their limits):

- **At least once.** A job runs again if its worker dies before the completion commits.
  A handler that moves money writes through ``ctx.session``: its writes and the job's
  completion commit in one transaction, *fenced* by the attempt's token, so of all the
  attempts exactly one commits its effect. Side effects outside PostgreSQL (HTTP, e-mail)
  need an idempotency key (``ctx.id`` is stable across attempts).
- **Leases.** A running attempt holds a lease of ``JOBS_LEASE`` (120 s, seed 000's
  ``lockDuration``) renewed every lease/4 by its process. Every ``JOBS_STALLED_CHECK``
  (30 s) any worker re-queues jobs whose lease expired (log ``jobs.stalled``, counter
  ``surge_jobs_stalled_total``); a job that stalled more than ``max_stalled`` times
  (``JOBS_MAX_STALLED`` = 2, BullMQ's ``maxStalledCount`` rule) is failed instead.
- **Attempts.** Every start counts. A raising handler is retried after
  ``backoff × 2^(attempt-1)`` (equal jitter, capped) until ``max_attempts``, then
  ``failed`` with its last error; failed jobs are kept until retried (``retry_job``,
  ``POST /api/admin/jobs/{id}/retry``) — never silently deleted. A handler waiting on
  something outside the job raises ``Snooze(delay)``: back to the queue after ``delay``,
  that start not counted (the handler bounds its own waiting).
- **Rate limit.** ``JOBS_RATE_LIMITS={"operations": "50/min"}``: at most 50 *starts* of that
  queue's jobs in any 60 s window, across every worker process (a sliding log in PostgreSQL
  under an advisory lock). A start that snoozes gives its place in the window back.
- **Periodic.** ``@job("reports.daily", cron="0 6 * * *")``: one job per slot (UTC), enqueued
  by exactly one worker, at most ``JOBS_STALLED_CHECK`` late.

Errors: see ``surge.kit.jobs.errors``.
"""

from __future__ import annotations

from surge.kit.jobs.context import JobContext
from surge.kit.jobs.errors import (
    JobError,
    JobNotFound,
    JobStateConflict,
    LeaseLost,
    Snooze,
    UnknownJob,
)
from surge.kit.jobs.queue import (
    JobInfo,
    QueueStats,
    cancel_job,
    chunked,
    enqueue,
    enqueue_batches,
    enqueue_many,
    enqueue_now,
    get_job,
    queue_stats,
    recent_failures,
    retry_job,
)
from surge.kit.jobs.registry import JobSpec, get_spec, job, load_modules, registered

__all__ = [
    "JobContext",
    "JobError",
    "JobInfo",
    "JobNotFound",
    "JobSpec",
    "JobStateConflict",
    "LeaseLost",
    "QueueStats",
    "Snooze",
    "UnknownJob",
    "cancel_job",
    "chunked",
    "enqueue",
    "enqueue_batches",
    "enqueue_many",
    "enqueue_now",
    "get_job",
    "get_spec",
    "job",
    "load_modules",
    "queue_stats",
    "recent_failures",
    "registered",
    "retry_job",
]
