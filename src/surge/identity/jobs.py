"""Identity's periodic jobs (run by ``surge worker``; ``surge.worker`` discovers this module)."""

from __future__ import annotations

from datetime import timedelta

from surge.identity.recovery import REQUESTED_JOB
from surge.identity.recovery import password_reset as password_reset_service
from surge.identity.service import identity as identity_service
from surge.kit.jobs import JobContext, job


@job(
    "identity.active_subscriptions.refresh",
    queue="identity",
    cron="* * * * *",  # seed 003: every minute
    max_attempts=1,  # the next slot is a minute away: retrying a missed one is pointless
    timeout=timedelta(seconds=50),
)
async def refresh_active_subscriptions_job(ctx: JobContext) -> None:
    """``REFRESH MATERIALIZED VIEW CONCURRENTLY active_subscriptions`` in the job's unit of
    work; skipped when another process refreshed it less than 50 s ago."""
    refreshed = await identity_service.refresh_view(ctx.session, min_age=50)
    ctx.log.info("identity.view_refresh_job", refreshed=refreshed)


@job(REQUESTED_JOB, queue="identity", max_attempts=5)
async def password_reset_requested(ctx: JobContext) -> None:
    """A "forgot my password" request: the account is looked up here, not in the request
    (same answer and timing for every address), and the link is mailed via the outbox."""
    await password_reset_service.issue(
        ctx.session, ctx.runtime, email=str(ctx.payload["email"]),
        ip=str(ctx.payload.get("ip") or "") or None,
    )  # fmt: skip
