"""The notifications domain's Prometheus alerting rules, from its own settings.

SES puts a sending account under review at 5 % bounces or 0.1 % complaints (ADR 0019). The
gauges hold the last ``NOTIFY_RATE_WINDOW``, refreshed by the ``notifications.rates.check``
job; no alert fires under ``NOTIFY_RATE_MIN_SENT`` e-mails sent. ``surge alert-rules`` writes
them into ``deploy/prometheus/alerts.yml`` after the kit's rules.
"""

from __future__ import annotations

from surge.config import Settings
from surge.kit.telemetry.prometheus_rules import PromRule


def alert_rules(settings: Settings) -> list[PromRule]:
    bounce, complaint = settings.NOTIFY_BOUNCE_RATE_ALERT, settings.NOTIFY_COMPLAINT_RATE_ALERT
    floor = settings.NOTIFY_RATE_MIN_SENT
    return [
        PromRule(
            "EmailBounceRateHigh",
            f"max(surge_notify_bounce_rate) > {bounce:g}\n"
            f"  and on() max(surge_notify_window_sent) >= {floor}",
            f"e-mail bounce rate above {bounce:.0%} over the last day",
            "{{ $value | humanizePercentage }} of sent e-mail hard-bounced; "
            "see /api/admin/suppressions.",
            "warning",
            "10m",
            comment="notifications (ADR 0019): SES reviews an account at 5 % bounces.",
        ),
        PromRule(
            "EmailComplaintRateHigh",
            f"max(surge_notify_complaint_rate) > {complaint:g}\n"
            f"  and on() max(surge_notify_window_sent) >= {floor}",
            f"e-mail complaint rate above {complaint:.1%} over the last day",
            "{{ $value | humanizePercentage }} of sent e-mail was reported as spam.",
            "critical",
            "10m",
            comment="notifications (ADR 0019): SES reviews an account at 0.1 % complaints.",
        ),
    ]
