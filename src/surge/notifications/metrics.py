"""The notifications domain's metrics, and the one way to count an outcome: after the
commit of the transaction that recorded it (a rolled-back outcome is not counted)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.db import on_commit

EVENTS = Counter(
    "surge_notify_events_total",
    "Final outcomes of e-mails (sent, bounced, blocked, failed, unconfirmed, held, skipped) "
    "and feedback (complained, delivered, unsubscribed); one per message, not per try.",
    ["event"],
)
DEFERRALS = Counter("surge_notify_deferrals_total", "Transient failures (one per try).", ["stage"])
#: The last 24 h (NOTIFY_RATE_WINDOW), refreshed by the ``notifications.rates.check`` job:
#: what SES reviews an account on (alerts in deploy/prometheus/alerts.yml).
BOUNCE_RATE = Gauge("surge_notify_bounce_rate", "Hard bounces / sent over the rate window.",
                    multiprocess_mode="max")  # fmt: skip
COMPLAINT_RATE = Gauge("surge_notify_complaint_rate", "Complaints / sent over the rate window.",
                       multiprocess_mode="max")  # fmt: skip
WINDOW_SENT = Gauge("surge_notify_window_sent", "E-mails sent over the rate window.",
                    multiprocess_mode="max")  # fmt: skip


def count(session: AsyncSession, event: str) -> None:
    """Count ``event`` once ``session``'s transaction commits."""
    counter = EVENTS.labels(event)

    async def bump() -> None:
        counter.inc()

    on_commit(session, bump)
