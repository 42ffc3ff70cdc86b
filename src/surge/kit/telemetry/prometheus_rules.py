"""The Prometheus alerting rules, generated from the same thresholds as the in-process rules.

One source: ``AlertThresholds`` (built from the ``ALERT_*`` settings) feeds both
``surge.kit.telemetry.alerts.default_rules`` (evaluated in-process) and ``render_rules`` here,
whose output is committed as ``deploy/prometheus/alerts.yml`` by ``surge alert-rules --write``.
A test regenerates the file and compares it with the committed one, so a threshold changed in
the settings without regenerating fails the build instead of drifting; another runs
Prometheus' own ``promtool test rules`` on it (``deploy/prometheus/alerts.test.yml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from surge.config import Settings


@dataclass(frozen=True)
class AlertThresholds:
    """Every alert threshold, in base units (seconds, ratios)."""

    response_p95: float = 0.2
    errors_per_minute: float = 10.0
    error_ratio: float = 0.01
    cache_hit_ratio: float = 0.9
    memory: float = 0.9
    slow_query: float = 0.5
    jobs_lag_s: float = 60.0
    shed_ratio: float = 0.01
    shed_ratio_critical: float = 0.1

    @classmethod
    def from_settings(cls, settings: Settings) -> AlertThresholds:
        return cls(
            response_p95=settings.ALERT_RESPONSE_P95.total_seconds(),
            errors_per_minute=settings.ALERT_ERRORS_PER_MINUTE,
            error_ratio=settings.ALERT_ERROR_RATIO,
            cache_hit_ratio=settings.ALERT_CACHE_HIT_RATIO,
            memory=settings.ALERT_MEMORY_RATIO,
            slow_query=settings.DB_SLOW_QUERY.total_seconds(),
            jobs_lag_s=settings.ALERT_JOBS_LAG.total_seconds(),
            shed_ratio=settings.ALERT_SHED_RATIO,
            shed_ratio_critical=settings.ALERT_SHED_RATIO_CRITICAL,
        )


@dataclass(frozen=True)
class PromRule:
    """One Prometheus alerting rule (the fields of a ``rules:`` item)."""

    alert: str
    expr: str
    summary: str
    description: str
    severity: str = "warning"
    for_: str | None = None
    comment: str | None = None
    runbook: str | None = None
    """What the person paged does first (the ``runbook`` annotation)."""


def _g(value: float) -> str:
    """A threshold as Prometheus and humans read it: 0.2, 10, 0.01 (no float noise)."""
    return f"{value:g}"


def _pct(value: float) -> str:
    return f"{value * 100:g} %"


#: Requests refused at the door (``kit.web.admission``) never reach the RED metrics: the
#: share of arrivals shed is shed / (served + shed).
_SHED = "sum(rate(http_requests_shed_total[5m]))"
_ARRIVED = f"(sum(rate(http_requests_total[5m])) + {_SHED})"
SHED_RUNBOOK = (
    "Split by reason: sum by (reason) (rate(http_requests_shed_total[5m])). "
    "too_old: requests waited longer than SURGE_HTTP_QUEUE_PATIENCE before reaching the app "
    "(accept queue, proxy, event-loop backlog): the web tier is short of CPU; check CPU and "
    "event-loop lag per API process, add processes (SURGE_WEB_WORKERS) or hosts, and look "
    "for a traffic spike to rate-limit. busy: a process hit SURGE_HTTP_MAX_IN_FLIGHT: "
    "requests are held by something slow; check p95, the DB pool's waiting count, slow "
    "queries and open breakers in the console. Raising either setting hides the overload "
    "instead of curing it. Shed requests got 503 + Retry-After: nothing was half-done."
)


def _shed_rules(t: AlertThresholds) -> list[PromRule]:
    """Load shedding (ADR 0016): a warning when a steady share of arrivals is refused (10
    min), a page when a large one is (5 min). A burst shorter than a minute fires neither:
    the 5-minute rate smears it over about 5 minutes, under either ``for``. Fleets idler
    than 0.05 shed/s (15 in 5 min) stay silent."""
    rules = []
    for ratio, severity, for_ in (
        (t.shed_ratio, "warning", "10m"),
        (t.shed_ratio_critical, "critical", "5m"),
    ):
        rules.append(
            PromRule(
                "HighShedRatio",
                f"{_SHED}\n  / {_ARRIVED} > {_g(ratio)}\nand on() {_SHED} > 0.05",
                f"more than {_pct(ratio)} of requests are shed at the door (503)",
                "{{ $value | humanizePercentage }} of arriving requests were refused by "
                "admission control over 5 min.",
                severity,
                for_,
                f"Admission control sheds above {_pct(ratio)} of arrivals "
                f"(ALERT_SHED_RATIO{'_CRITICAL' if severity == 'critical' else ''}).",
                SHED_RUNBOOK,
            )
        )
    return rules


def prometheus_rules(t: AlertThresholds) -> list[PromRule]:
    """The rules, in the order the console and the file show them."""
    lookups = 'sum by (cache) (rate(cache_hits_total{tier="l1"}[5m]) + rate(cache_misses_total{tier="l1"}[5m]))'
    hits = "sum by (cache) (rate(cache_hits_total[5m]))"
    return [
        PromRule(
            "HighErrorRatio",
            'sum(rate(http_requests_total{status=~"5.."}[5m]))\n'
            f"  / sum(rate(http_requests_total[5m])) > {_g(t.error_ratio)}",
            f"more than {_pct(t.error_ratio)} of responses are server errors",
            "{{ $value | humanizePercentage }} of responses were 5xx over 5 min.",
            "critical",
            "2m",
            "Seed 003: error rate above 1 % (ALERT_ERROR_RATIO).",
        ),
        PromRule(
            "HighErrorRate",
            f'sum(increase(http_requests_total{{status=~"5.."}}[1m])) > {_g(t.errors_per_minute)}',
            f"more than {_g(t.errors_per_minute)} server errors per minute",
            '{{ $value | printf "%.0f" }} 5xx responses in the last minute.',
            "critical",
            "1m",
            "Seed 002: more than 10 errors per minute (ALERT_ERRORS_PER_MINUTE).",
        ),
        PromRule(
            "HighResponseTime",
            "histogram_quantile(0.95,\n"
            f"  sum by (le) (rate(http_request_duration_seconds_bucket[5m]))) > {_g(t.response_p95)}",
            f"p95 response time above {_g(t.response_p95 * 1000)} ms",
            "p95 over 5 min is {{ $value | humanizeDuration }}.",
            "warning",
            "2m",
            "Seed 003: p95 above 200 ms (ALERT_RESPONSE_P95).",
        ),
        PromRule(
            "LowCacheHitRatio",
            f"{hits}\n  / {lookups} < {_g(t.cache_hit_ratio)}\nand {lookups} > 0.1",
            f"cache {{{{ $labels.cache }}}} hit ratio below {_pct(t.cache_hit_ratio)}",
            "{{ $value | humanizePercentage }} of lookups hit L1 or L2 over 5 min.",
            "warning",
            "10m",
            "Seed 003: cache hits below 90 % (ALERT_CACHE_HIT_RATIO); a hit is an L1 or L2 hit,\n"
            "a lookup is every L1 lookup; idle caches (< 0.1 lookup/s) are ignored.",
        ),
        PromRule(
            "HighMemoryUsage",
            f"max(surge_system_memory_used_ratio) > {_g(t.memory)}",
            f"machine memory use above {_pct(t.memory)}",
            "{{ $value | humanizePercentage }} of memory in use.",
            "warning",
            "5m",
            "Seed 002: memory above 90 % (ALERT_MEMORY_RATIO).",
        ),
        PromRule(
            "SlowDatabaseQuery",
            f"max(db_query_max_seconds) > {_g(t.slow_query)}\n"
            "and on() sum(increase(db_slow_queries_total[5m])) > 0",
            f"a database query took longer than {_g(t.slow_query * 1000)} ms",
            "The slowest recent query took {{ $value | humanizeDuration }}.",
            comment="Seed 002: a query above 500 ms (DB_SLOW_QUERY). db_slow_queries_total counts\n"
            "them; db_query_max_seconds holds the duration of the latest one.",
        ),
        PromRule(
            "CircuitBreakerOpen",
            "max by (breaker) (breaker_state) >= 2",
            "circuit breaker {{ $labels.breaker }} is open",
            "Calls to {{ $labels.breaker }} are refused; see the console's breakers view.",
            "critical",
            comment="breaker_state: 0 closed, 1 half-open, 2 open.",
        ),
        PromRule(
            "JobQueueLag",
            f"max by (queue) (surge_jobs_queue_lag_seconds) > {_g(t.jobs_lag_s)}",
            f"job queue {{{{ $labels.queue }}}} lags more than {_g(t.jobs_lag_s)} s",
            "The oldest ready job has waited {{ $value | humanizeDuration }}.",
            "warning",
            "2m",
        ),
        PromRule(
            "EgressProxiesExhausted",
            "count(egress_proxy_active) > 0 and sum(egress_proxy_active) == 0",
            "every egress proxy is inactive (blocked or failing)",
            "Outbound calls through the proxy pool fail with PROXY_BLOCKED.",
            "critical",
            "1m",
        ),
        PromRule(
            "RedisDown",
            "min(redis_up) == 0",
            "a Surge process cannot reach Redis (degraded: caches and limits local)",
            "Reads fall back to L1 and the database; nothing is lost.",
            "warning",
            "1m",
        ),
        *_shed_rules(t),
    ]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


HEADER = """\
# GENERATED by `surge alert-rules --write` from the ALERT_* settings: do not edit by hand.
# tests/kit/test_prometheus_rules.py fails when this file and the settings disagree, and runs
# `promtool test rules alerts.test.yml` on it.
#
# Load with `rule_files: [alerts.yml]`; route with Alertmanager to the same Slack-compatible
# webhook as SURGE_ALERT_WEBHOOK_URL (`send_resolved: true` gives the "resolved" message).
# The same thresholds run in-process in surge.kit.telemetry.alerts when no Prometheus runs.
"""


def render_rules(rules: list[PromRule]) -> str:
    """The rules file as YAML text (written by hand: stable, commented, diff-friendly)."""
    out = [HEADER, "groups:\n", "  - name: surge\n", "    rules:\n"]
    for i, rule in enumerate(rules):
        if i:
            out.append("\n")
        if rule.comment:
            out += [f"      # {line}\n" for line in rule.comment.splitlines()]
        out.append(f"      - alert: {rule.alert}\n")
        out.append("        expr: |\n")
        out += [f"          {line}\n" for line in rule.expr.splitlines()]
        if rule.for_:
            out.append(f"        for: {rule.for_}\n")
        out.append("        labels:\n")
        out.append(f"          severity: {rule.severity}\n")
        out.append("        annotations:\n")
        out.append(f"          summary: {_quote(rule.summary)}\n")
        out.append(f"          description: {_quote(rule.description)}\n")
        if rule.runbook:
            out.append(f"          runbook: {_quote(rule.runbook)}\n")
    return "".join(out)


def rules_from_settings(settings: Settings, extra: Sequence[PromRule] = ()) -> str:
    """The whole rules file: the kit's rules from the ``ALERT_*`` settings, then ``extra``
    (each domain's own rules, from its own settings — ``surge.cli.alert_rules_text``)."""
    return render_rules([*prometheus_rules(AlertThresholds.from_settings(settings)), *extra])
