"""The wallet's jobs: earnings batches, withdrawal notifications, and upkeep (stats view
refresh, monthly partitions, expired idempotency keys). ``surge.worker`` imports this module.

Each handler writes through ``ctx.session``, which the runner commits together with the
job's completion, fenced by the attempt's token: a worker killed mid-batch leaves nothing,
and of all attempts exactly one commits (ADR 0007, ADR 0010).
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from surge.config import settings
from surge.identity.service import identity as identity_service
from surge.kit.errors import NotFound
from surge.kit.jobs import JobContext, job
from surge.kit.web.idempotency import idempotency_keys
from surge.notifications.service import notifications as notifications_service
from surge.wallet.service import EARNINGS_JOB, NOTIFY_JOB
from surge.wallet.service import wallet as wallet_service

# The cron schedule is fixed when the job registers, so it reads the process's settings.
_REFRESH_MINUTES = max(1, int(settings.WALLET_STATS_REFRESH.total_seconds() // 60))


@job(EARNINGS_JOB, queue="wallet", max_attempts=10, backoff=timedelta(seconds=2))
async def credit_earnings(ctx: JobContext) -> None:
    """Credit one batch of partners for one revenue event and enqueue the next batch."""
    after = ctx.payload.get("after")
    await wallet_service.credit_earnings_batch(
        ctx.session,
        ctx.runtime,
        event_id=str(ctx.payload["event_id"]),
        after=UUID(after) if after else None,
    )
    wallet_service.invalidate_after_commit(ctx.session, ctx.runtime)


@job(NOTIFY_JOB, queue="wallet", max_attempts=5)
async def notify_withdrawal(ctx: JobContext) -> None:
    """Tell the partner its withdrawal was decided: one outbox e-mail per withdrawal, written
    in this job's transaction (enqueued in the decision's), sent by the notifications job."""
    withdrawal = await wallet_service.withdrawal_by_id(
        ctx.session, UUID(str(ctx.payload["withdrawal_id"]))
    )
    if withdrawal is None:
        return
    try:
        partner = await identity_service.get_user(ctx.session, withdrawal.owner_id)
    except NotFound:  # the partner's account is gone: nobody to tell
        return
    await notifications_service.send(
        ctx.session,
        to=partner.email,
        user_id=withdrawal.owner_id,
        template="withdrawal_decided",
        context={
            "withdrawal_id": str(withdrawal.id),
            "status": withdrawal.status,
            "amount": withdrawal.amount,
            "currency": withdrawal.currency,
            "reason": withdrawal.reason,
        },
        category="wallet",
        key=f"withdrawal-decided:{withdrawal.id}",
    )


@job("wallet.stats.refresh", queue="wallet", cron=f"*/{_REFRESH_MINUTES} * * * *")
async def refresh_stats(ctx: JobContext) -> None:
    """Seed 001: refresh the dashboard view concurrently every WALLET_STATS_REFRESH."""
    await wallet_service.refresh_stats(ctx.session)


@job("wallet.partitions.ensure", queue="wallet", cron="7 * * * *")
async def ensure_partitions(ctx: JobContext) -> None:
    """Keep WALLET_PARTITION_MONTHS_AHEAD monthly partitions created ahead (hourly: cheap,
    idempotent, and a missed run is made up long before a month boundary)."""
    created = await wallet_service.ensure_partitions(ctx.session, ctx.runtime)
    if created:
        ctx.log.info("wallet.partitions.created", count=created)


@job("wallet.idempotency.purge", queue="wallet", cron="23 * * * *")
async def purge_idempotency_keys(ctx: JobContext) -> None:
    """Forget HTTP idempotency keys older than their 24 h lifetime."""
    purged = await idempotency_keys.purge(ctx.session)
    if purged:
        ctx.log.info("wallet.idempotency.purged", count=purged)


@job("wallet.pending_credits.sweep", queue="wallet", cron="* * * * *")
async def sweep_pending_credits(ctx: JobContext) -> None:
    """Post the pending credits (ADR 0065) that no process posted after their commit: a
    process that crashed in between, or a posting that failed. Every minute; a no-op (one
    index read) when there are none. Each account posts in its own transaction."""
    posted = await wallet_service.ledger.sweep_pending_credits(ctx.runtime.db.primary)
    if posted:
        ctx.log.warning("wallet.pending_credits.swept", count=posted)
