"""The operations job: one operation run on the provider (``surge.worker`` imports this).

Queue ``operations``: its start rate is limited fleet-wide by ``JOBS_RATE_LIMITS``
(seed 000: ``{"operations": "50/min"}``), its fleet sized by ``surge worker --processes 8
--concurrency 8`` (seed 000's 8 × 8).
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from surge.config import settings
from surge.kit.jobs import JobContext, job
from surge.operations.service import RUN_JOB, RetryLater
from surge.operations.service import operations as operations_service

MAX_ATTEMPTS = settings.OPERATIONS_MAX_ATTEMPTS


@job(RUN_JOB, queue="operations", max_attempts=MAX_ATTEMPTS,
     backoff=settings.OPERATIONS_RETRY_BACKOFF, backoff_max=settings.OPERATIONS_RETRY_BACKOFF_MAX)  # fmt: skip
async def run_operation(ctx: JobContext) -> None:
    """One attempt; ``RetryLater`` makes the queue run it again after its backoff. The last
    attempt never raises it: it decides (failed, or needs_review when the provider may have
    done the work)."""
    # The limit the job was enqueued with (its row's), not this process's setting: the API
    # that enqueued it may be configured otherwise.
    limit = int(ctx.payload.get("max_attempts") or MAX_ATTEMPTS)
    try:
        status = await operations_service.run(
            ctx.session, ctx.runtime, UUID(str(ctx.payload["operation_id"])),
            attempt=ctx.attempt, last=ctx.attempt >= limit,
        )  # fmt: skip
    except RetryLater as reason:
        ctx.log.info("operations.retry", attempt=ctx.attempt, reason=str(reason))
        raise
    ctx.log.info("operations.attempt", attempt=ctx.attempt, status=status)


@job("operations.reap", queue="operations", cron="* * * * *")
async def reap_operations(ctx: JobContext) -> None:
    """Every minute: decide operations whose job died for good (see ``reap``)."""
    decided = await operations_service.reap(ctx.session, older_than=timedelta(minutes=10))
    if any(decided.values()):
        ctx.log.warning("operations.reaped", **decided)
