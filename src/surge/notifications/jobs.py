"""The outbox's jobs: send e-mails (a batch per job), and a sweeper for messages whose job
was lost.

``notifications.email.send`` is the one place that commits more than once per job, on
purpose (ADR 0019, 0026): the decision to send (a read), the "end of DATA is going on the
wire" mark, and the outcome are short statements of their own, so that no database
transaction stays open across an SMTP conversation and a worker killed at any point leaves
a state the next attempt can read: ``queued`` (nothing left the machine: send again) or
``sending`` (the relay may have it: never send again, record ``unconfirmed``).
"""

from __future__ import annotations

from datetime import timedelta

from surge.kit.jobs import JobContext, job
from surge.notifications.service import SEND_JOB, check_rates
from surge.notifications.service import notifications as notifications_service


@job(SEND_JOB, queue="email", max_attempts=10, backoff=timedelta(seconds=5))
async def send_email(ctx: JobContext) -> None:
    """Send one outbox message, and up to ``NOTIFY_SEND_BATCH - 1`` others whose send jobs
    were ready, one after another (``surge.notifications.batch``, ADR 0031). Retries
    of *transient SMTP failures* are new jobs on the NOTIFY_RETRY_SCHEDULE; this job's own
    retries cover database errors only.

    The common path never opens the job's session: the read, the mark and the ``sent``
    outcome are autocommit statements shared with the process's other send jobs
    (``surge.notifications.coalesce``), and the job's completion is then acked in a batch.
    Only the rare outcomes (held, skipped, deferred, bounced...) use a transaction."""
    await notifications_service.send_job(ctx)


@job("notifications.outbox.sweep", queue="email", cron="*/5 * * * *", max_attempts=1)
async def sweep_outbox(ctx: JobContext) -> None:
    """Every 5 min: re-enqueue queued messages overdue by 15 min."""
    count = await notifications_service.sweep(ctx.session, grace=timedelta(minutes=15))
    if count:
        ctx.log.warning("notifications.outbox.swept", count=count)


@job("notifications.rates.check", queue="email", cron="*/5 * * * *", max_attempts=1)
async def check_rates_job(ctx: JobContext) -> None:
    """Every 5 min: bounce and complaint rates of the last day, as gauges and warnings."""
    await check_rates(ctx.session, ctx.runtime)
