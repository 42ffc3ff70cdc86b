"""The payments jobs: process a payment's inbox events, reconcile open top-ups.
``surge.worker`` imports this module.

Jobs of one payment share ``lock_key=payment:<id>``: they never run at the same time, so a
payment's events are applied one after the other, in the provider's order. Every write goes
through ``ctx.session`` and commits with the job's completion (ADR 0007): a worker killed
mid-way leaves nothing, and the retry's ledger postings are keyed by the provider's payment
id, so they land once.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from surge.kit.jobs import JobContext, job
from surge.payments.service import PROCESS_JOB, RECONCILE_JOB
from surge.payments.service import topup as topup_service
from surge.wallet.service import changed_owners, stats_key


def _invalidate_stats(ctx: JobContext) -> None:
    owners = changed_owners(ctx.session)
    if owners:
        ctx.runtime.cache.invalidate_on_commit(ctx.session, keys=[stats_key(o) for o in owners])


@job(PROCESS_JOB, queue="payments", max_attempts=10, backoff=timedelta(seconds=1))
async def process_events(ctx: JobContext) -> None:
    """Apply one payment's pending provider events (credit once; reverse refunds/disputes)."""
    await topup_service.process_events(
        ctx.session, ctx.runtime, payment_id=str(ctx.payload["payment_id"])
    )
    _invalidate_stats(ctx)


@job(RECONCILE_JOB, queue="payments", max_attempts=5, backoff=timedelta(seconds=10))
async def reconcile_topup(ctx: JobContext) -> None:
    """Settle one open top-up from the provider's answer (its webhook never came)."""
    await topup_service.reconcile_topup(
        ctx.session, ctx.runtime, UUID(str(ctx.payload["topup_id"]))
    )
    _invalidate_stats(ctx)


@job("payments.reconcile", queue="payments", cron="* * * * *")
async def reconcile(ctx: JobContext) -> None:
    """Every minute: queue a reconciliation for each top-up open too long."""
    queued = await topup_service.enqueue_reconciliation(ctx.session, ctx.runtime)
    if queued:
        ctx.log.info("payments.reconcile.queued", jobs=queued)


@job("payments.provider.scan", queue="payments", cron="*/5 * * * *")
async def scan_provider(ctx: JobContext) -> None:
    """Every 5 minutes: settle recent provider intents Surge has no row for, or an open one."""
    applied = await topup_service.scan_provider(ctx.session, ctx.runtime)
    if applied:
        ctx.log.warning("payments.scan.settled", payments=applied)
    _invalidate_stats(ctx)
