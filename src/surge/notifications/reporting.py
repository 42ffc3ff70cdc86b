"""What an admin reads: the last messages, and the bounce and complaint rates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.runtime import Runtime
from surge.kit.web.pagination import Slice
from surge.models.notifications import OutboxMessage
from surge.notifications import repository
from surge.notifications.keys import now
from surge.notifications.metrics import BOUNCE_RATE, COMPLAINT_RATE, WINDOW_SENT

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Rates:
    since: datetime
    sent: int
    bounced: int
    complained: int

    @property
    def bounce_rate(self) -> float:
        return self.bounced / self.sent if self.sent else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complained / self.sent if self.sent else 0.0


async def window_rates(session: AsyncSession, *, within: timedelta = timedelta(days=1)) -> Rates:
    """Bounce and complaint rates over ``within`` (SES reviews at 5 % and 0.1 %)."""
    since = now() - within
    totals = await repository.event_totals(session, since=since)
    sent = totals.get("sent", 0) + totals.get("unconfirmed", 0)
    return Rates(since, sent, totals.get("bounced", 0), totals.get("complained", 0))


async def check_rates(session: AsyncSession, runtime: Runtime) -> Rates:
    """Publish the window's bounce and complaint rates as gauges, and log a warning when
    one is above its threshold with enough volume to mean something."""
    settings = runtime.settings
    rates = await window_rates(session, within=settings.NOTIFY_RATE_WINDOW)
    BOUNCE_RATE.set(rates.bounce_rate)
    COMPLAINT_RATE.set(rates.complaint_rate)
    WINDOW_SENT.set(rates.sent)
    if rates.sent >= settings.NOTIFY_RATE_MIN_SENT:
        for name, value, limit in (
            ("bounce", rates.bounce_rate, settings.NOTIFY_BOUNCE_RATE_ALERT),
            ("complaint", rates.complaint_rate, settings.NOTIFY_COMPLAINT_RATE_ALERT),
        ):
            if value > limit:
                log.warning("notifications.rate.above_threshold", rate=name, value=round(value, 4),
                            threshold=limit, sent=rates.sent)  # fmt: skip
    return rates


class ReportingUseCases:
    """The admin console's reads."""

    async def recent(
        self, session: AsyncSession, *, limit: int, cursor: str | None = None,
        status: str | None = None,
    ) -> Slice[OutboxMessage]:  # fmt: skip
        """The last e-mails, newest first, a page at a time."""
        return await repository.recent_messages(session, limit=limit, cursor=cursor, status=status)

    async def rates(self, session: AsyncSession, *, within: timedelta = timedelta(days=1)) -> Rates:
        """Bounce and complaint rates over ``within`` (SES reviews at 5 % and 0.1 %)."""
        since = now() - within
        totals = await repository.event_totals(session, since=since)
        sent = totals.get("sent", 0) + totals.get("unconfirmed", 0)
        return Rates(since, sent, totals.get("bounced", 0), totals.get("complained", 0))
