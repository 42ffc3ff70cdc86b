"""Alert rules evaluated in-process, delivered to a Slack-compatible webhook.

    UpstreamError (surge.kit.breaker)
    └── BreakerOpenError        the webhook's own breaker ("alerts-webhook") is open
    AlertDeliveryError (< UpstreamError)   the webhook failed after its retries

Seed 002 asks for alerts when p95 response time > 1 s, errors > 10/min, memory > 90 %, a DB
query > 500 ms; we add "a circuit breaker is open" and "job queue lag above a bound". Every
``interval`` the evaluator takes a snapshot of the Prometheus registry (the multiprocess
aggregate when ``PROMETHEUS_MULTIPROC_DIR`` is set, so one evaluator sees every process of
the host), computes each rule over the interval since the previous snapshot (rates and p95
come from counter and histogram *deltas*, as ``rate()``/``histogram_quantile()`` would), and:

- a rule that starts firing sends one message, then stays silent for ``cooldown`` (while it
  keeps firing, one reminder per cool-down, like Alertmanager's ``repeat_interval``);
- a rule that stops firing after a message was sent sends one "resolved" message;
- a rule that fires again within the cool-down of its last message is not re-announced
  (flapping), and then no "resolved" follows for it either.

One process per Redis evaluates and notifies (a lease in Redis, renewed every round): every
process of a host sees the same aggregated metrics, and N web processes must not send N
copies of one alert. While Redis is down the last known leader carries on.

Delivery: ``POST`` JSON ``{"text": ..., "attachments": [...]}`` (what Slack, Mattermost and
Rocket.Chat incoming webhooks accept), ``retries`` attempts with jittered backoff, inside a
breaker of its own so a dead webhook costs one fast rejection per message, never a stuck
evaluator. The same thresholds generate ``deploy/prometheus/alerts.yml`` (``prometheus_rules``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import structlog
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import multiprocess as prom_multiprocess

from surge.kit.aio import cancel_until_done
from surge.kit.backoff import delay as backoff_delay
from surge.kit.breaker import BreakerConfig, BreakerRegistry, UpstreamError
from surge.kit.breaker import breakers as default_breakers
from surge.kit.telemetry import metrics
from surge.kit.telemetry.metrics import multiprocess_dir
from surge.kit.telemetry.prometheus_rules import AlertThresholds

if TYPE_CHECKING:
    from surge.config import Settings
    from surge.kit.redis import RedisGateway

log = structlog.get_logger()

Labels = frozenset[tuple[str, str]]


class AlertDeliveryError(UpstreamError):
    """The alert webhook did not accept a message after its retries."""


# ---- metric snapshots --------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """Every sample of the registry at one moment: (sample name, labels) -> value."""

    taken_at: float
    values: dict[tuple[str, Labels], float]

    def select(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        out = []
        for (sample, labels), value in self.values.items():
            if sample != name:
                continue
            as_dict = dict(labels)
            if all(as_dict.get(k) == v for k, v in match.items()):
                out.append((as_dict, value))
        return out

    def total(self, name: str, **match: str) -> float:
        return sum(value for _, value in self.select(name, **match))

    def has(self, name: str) -> bool:
        return any(sample == name for sample, _ in self.values)


def take_snapshot(registry: CollectorRegistry | None = None) -> Snapshot:
    """Read the registry (aggregated over processes in multiprocess mode)."""
    metrics.flush_all()
    if registry is None:
        if multiprocess_dir():
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
    values: dict[tuple[str, Labels], float] = {}
    for family in registry.collect():
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            # Multiprocess "liveall" gauges repeat per pid: keep the largest.
            values[key] = max(values.get(key, -math.inf), sample.value)
    return Snapshot(time.monotonic(), values)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's ``histogram_quantile`` over cumulative bucket counts {le: count}."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # the highest finite bucket is the best we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def delta(current: Snapshot, previous: Snapshot | None, name: str, **match: str) -> float:
    """Increase of a counter over the interval (a restart that lowers it counts as 0)."""
    now = current.total(name, **match)
    before = previous.total(name, **match) if previous is not None else now
    return max(0.0, now - before)


# ---- rules -------------------------------------------------------------------------------
Measure = Callable[[Snapshot, "Snapshot | None"], "tuple[float | None, str]"]


@dataclass(frozen=True)
class AlertRule:
    """``measure(current, previous)`` returns (value or None when there is no data, detail);
    the rule fires while value > threshold."""

    name: str
    summary: str
    threshold: float
    unit: str
    measure: Measure
    severity: str = "warning"


def p95_latency(current: Snapshot, previous: Snapshot | None) -> tuple[float | None, str]:
    buckets: dict[float, float] = {}
    for labels, value in current.select("http_request_duration_seconds_bucket"):
        le = float(labels["le"])
        buckets[le] = buckets.get(le, 0.0) + value
    if previous is not None:
        for labels, value in previous.select("http_request_duration_seconds_bucket"):
            le = float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) - value
    p95 = histogram_quantile(0.95, buckets)
    return p95, f"p95 over {int(max(buckets.values(), default=0))} requests"


def server_errors_per_minute(
    current: Snapshot, previous: Snapshot | None
) -> tuple[float | None, str]:
    if previous is None:
        return None, "first sample"
    errors = sum(
        max(0.0, value - previous.values.get(("http_requests_total", frozenset(labels.items())), 0))
        for labels, value in current.select("http_requests_total")
        if labels.get("status", "").startswith("5")
    )
    minutes = max(current.taken_at - previous.taken_at, 1e-3) / 60
    return errors / minutes, f"{int(errors)} responses 5xx in {minutes * 60:.0f} s"


def memory_ratio(current: Snapshot, previous: Snapshot | None) -> tuple[float | None, str]:
    values = [v for _, v in current.select("surge_system_memory_used_ratio")]
    return (max(values) if values else None), "machine memory in use"


def slow_queries(current: Snapshot, previous: Snapshot | None) -> tuple[float | None, str]:
    count = delta(current, previous, "db_slow_queries_total")
    slowest = max((v for _, v in current.select("db_query_max_seconds")), default=0.0)
    return (slowest if count > 0 else 0.0), f"{int(count)} slow queries, slowest {slowest:.3f} s"


def open_breakers(current: Snapshot, previous: Snapshot | None) -> tuple[float | None, str]:
    names = sorted(labels["breaker"] for labels, v in current.select("breaker_state") if v >= 2)
    return float(len(names)), ("open: " + ", ".join(names)) if names else "none open"


def jobs_lag(current: Snapshot, previous: Snapshot | None) -> tuple[float | None, str]:
    # kit.jobs exports surge_jobs_queue_lag_seconds; the bare name is accepted for other engines.
    values = current.select("surge_jobs_queue_lag_seconds") or current.select(
        "jobs_queue_lag_seconds"
    )
    if not values:
        return None, "no job queue lag metric"
    worst_labels, worst = max(values, key=lambda item: item[1])
    queue = worst_labels.get("queue", "")
    return worst, f"oldest ready job waited {worst:.0f} s" + (f" (queue {queue})" if queue else "")


def error_ratio(current: Snapshot, previous: Snapshot | None) -> tuple[float | None, str]:
    total = delta(current, previous, "http_requests_total")
    if previous is None or total <= 0:
        return None, "no requests"
    errors = sum(
        max(0.0, value - previous.values.get(("http_requests_total", frozenset(labels.items())), 0))
        for labels, value in current.select("http_requests_total")
        if labels.get("status", "").startswith("5")
    )
    return errors / total, f"{int(errors)} of {int(total)} responses were 5xx"


def cache_miss_ratio(current: Snapshot, previous: Snapshot | None) -> tuple[float | None, str]:
    """The worst cache's share of lookups that missed both tiers (1 - hit ratio): a lookup is
    an L1 lookup, a hit is an L1 or an L2 hit."""
    names = {labels["cache"] for labels, _ in current.select("cache_hits_total")}
    names |= {labels["cache"] for labels, _ in current.select("cache_misses_total")}
    worst: tuple[float, str] | None = None
    for name in sorted(names):
        hits = delta(current, previous, "cache_hits_total", cache=name)
        lookups = delta(current, previous, "cache_hits_total", cache=name, tier="l1") + delta(
            current, previous, "cache_misses_total", cache=name, tier="l1"
        )
        if lookups <= 0:
            continue
        miss = max(0.0, 1 - hits / lookups)
        if worst is None or miss > worst[0]:
            worst = (miss, f"cache {name}: {hits / lookups:.1%} hits over {int(lookups)} lookups")
    return (worst[0], worst[1]) if worst else (None, "no cache lookups")


def default_rules(
    *,
    response_p95: float | None = None,
    errors_per_minute: float | None = None,
    memory: float | None = None,
    slow_query: float | None = None,
    jobs_lag_s: float | None = None,
    thresholds: AlertThresholds | None = None,
) -> list[AlertRule]:
    """Seed 002/003's thresholds plus breaker and job-lag rules; the same thresholds generate
    deploy/prometheus/alerts.yml (``surge.kit.telemetry.prometheus_rules``)."""
    t = thresholds or AlertThresholds()
    overrides = {
        "response_p95": response_p95,
        "errors_per_minute": errors_per_minute,
        "memory": memory,
        "slow_query": slow_query,
        "jobs_lag_s": jobs_lag_s,
    }
    t = replace(t, **{k: v for k, v in overrides.items() if v is not None})
    return [
        AlertRule("HighErrorRatio", "share of 5xx responses above threshold", t.error_ratio, "ratio", error_ratio, "critical"),
        AlertRule(
            "HighErrorRate", "5xx responses per minute above threshold", t.errors_per_minute,
            "/min", server_errors_per_minute, "critical",
        ),
        AlertRule("HighResponseTime", "p95 response time above threshold", t.response_p95, "s", p95_latency),
        AlertRule(
            "LowCacheHitRatio", "cache miss ratio above threshold (hit ratio below 1 - it)",
            round(1 - t.cache_hit_ratio, 6), "ratio", cache_miss_ratio,
        ),
        AlertRule("HighMemoryUsage", "machine memory use above threshold", t.memory, "ratio", memory_ratio),
        AlertRule("SlowDatabaseQuery", "a DB query took longer than threshold", t.slow_query, "s", slow_queries),
        AlertRule("CircuitBreakerOpen", "a circuit breaker is open", 0, "breakers", open_breakers, "critical"),
        AlertRule("JobQueueLag", "job queue lag above threshold", t.jobs_lag_s, "s", jobs_lag),
    ]  # fmt: skip


# ---- delivery ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AlertEvent:
    rule: AlertRule
    status: str  # "firing" | "resolved"
    value: float | None
    detail: str
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def slack_payload(self, source: str) -> dict[str, Any]:
        firing = self.status == "firing"
        icon = ":rotating_light:" if firing else ":white_check_mark:"
        verb = "FIRING" if firing else "RESOLVED"
        value = "n/a" if self.value is None else f"{self.value:.3g}"
        text = f"{icon} [{verb}] {self.rule.name}: {self.rule.summary} on {source}"
        return {
            "text": text,
            "attachments": [
                {
                    "color": ("danger" if self.rule.severity == "critical" else "warning")
                    if firing
                    else "good",
                    "title": f"{self.rule.name} ({self.rule.severity})",
                    "text": self.detail,
                    "fields": [
                        {"title": "value", "value": f"{value} {self.rule.unit}", "short": True},
                        {
                            "title": "threshold",
                            "value": f"{self.rule.threshold:g} {self.rule.unit}",
                            "short": True,
                        },
                        {"title": "status", "value": self.status, "short": True},
                        {"title": "source", "value": source, "short": True},
                    ],
                    "ts": int(self.at.timestamp()),
                }
            ],
            "alert": {
                "name": self.rule.name,
                "status": self.status,
                "severity": self.rule.severity,
            },
        }


Notify = Callable[[AlertEvent], Awaitable[None]]


class WebhookNotifier:
    """Posts alerts to a Slack-compatible incoming webhook with retries and its own breaker."""

    def __init__(
        self,
        url: str,
        *,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 5.0,
        breakers: BreakerRegistry | None = None,
        source: str | None = None,
    ) -> None:
        self.url = url
        self.retries = retries
        self.backoff = backoff
        self.source = source or socket.gethostname()
        registry = breakers if breakers is not None else default_breakers
        # Each message already retries; 3 undeliverable messages in a row open it for 5 min.
        self.breaker = registry.get(
            "alerts-webhook",
            BreakerConfig(minimum_calls=3, window_size=3, failure_rate=1.0, open_duration=300),
        )
        self._client = httpx.AsyncClient(timeout=timeout, trust_env=False)

    async def _deliver(self, payload: dict[str, Any]) -> None:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                response = await self._client.post(self.url, json=payload)
                if response.status_code < 300:
                    return
                last = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    break  # a bad URL or payload will not get better
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if attempt < self.retries:
                await asyncio.sleep(
                    backoff_delay(attempt + 1, self.backoff, math.inf, jitter="full")
                )
        raise AlertDeliveryError(f"alert webhook failed: {last}")

    async def __call__(self, event: AlertEvent) -> None:
        await self.breaker.call(self._deliver, event.slack_payload(self.source))

    async def close(self) -> None:
        await self._client.aclose()


# ---- the evaluator -----------------------------------------------------------------------
# Take or renew the lease: 1 when this process leads (now or already), 0 otherwise.
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class RuleState:
    firing: bool = False
    since: float | None = None
    notified: bool = False
    last_notified: float | None = None
    value: float | None = None
    detail: str = ""


class AlertEvaluator:
    """Evaluates ``rules`` every ``interval`` seconds and notifies (see module docstring)."""

    def __init__(
        self,
        rules: Sequence[AlertRule],
        notify: Notify,
        *,
        interval: float = 15.0,
        cooldown: float = 300.0,
        snapshot: Callable[[], Snapshot] = take_snapshot,
        clock: Callable[[], float] = time.monotonic,
        gateway: RedisGateway | None = None,
        leader_key: str = "surge:alerts:leader",
    ) -> None:
        self.rules = list(rules)
        self.gateway = gateway
        self.leader_key = leader_key
        #: Unique per process; the leader's id is the value of ``leader_key``.
        self.origin = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._leader = gateway is None
        self.notify = notify
        self.interval = interval
        self.cooldown = cooldown
        self._snapshot = snapshot
        self._clock = clock
        self._previous: Snapshot | None = None
        self.states: dict[str, RuleState] = {rule.name: RuleState() for rule in self.rules}
        self._task: asyncio.Task[None] | None = None

    def firing(self) -> list[tuple[AlertRule, RuleState]]:
        return [(r, self.states[r.name]) for r in self.rules if self.states[r.name].firing]

    async def evaluate(self) -> list[AlertEvent]:
        """One evaluation round; returns the events it tried to send."""
        current = self._snapshot()
        previous, self._previous = self._previous, current
        now = self._clock()
        events: list[AlertEvent] = []
        for rule in self.rules:
            state = self.states[rule.name]
            try:
                value, detail = rule.measure(current, previous)
            except Exception:
                log.exception("alerts.rule_failed", rule=rule.name)
                continue
            state.value, state.detail = value, detail
            is_firing = value is not None and value > rule.threshold
            quiet = state.last_notified is not None and now - state.last_notified < self.cooldown
            if is_firing and not state.firing:
                state.firing, state.since = True, now
                state.notified = not quiet
                if state.notified:
                    events.append(AlertEvent(rule, "firing", value, detail))
                    state.last_notified = now
                else:
                    log.info("alerts.suppressed", rule=rule.name, reason="cooldown")
            elif is_firing and state.firing and not quiet:
                events.append(AlertEvent(rule, "firing", value, detail + " (still firing)"))
                state.notified, state.last_notified = True, now
            elif not is_firing and state.firing:
                state.firing, state.since = False, None
                if state.notified:
                    events.append(AlertEvent(rule, "resolved", value, detail))
                state.notified = False
        for event in events:
            log.warning(
                "alerts.firing" if event.status == "firing" else "alerts.resolved",
                rule=event.rule.name,
                value=event.value,
                detail=event.detail,
            )
            try:
                await self.notify(event)
            except Exception as exc:
                log.error("alerts.delivery_failed", rule=event.rule.name, error=str(exc)[:200])
        return events

    async def is_leader(self) -> bool:
        """One evaluator per Redis notifies: every process of a host sees the same aggregate
        metrics, and N web processes must not send N copies of one alert. The leader holds
        ``leader_key`` (renewed each round, expires after 3 intervals if it dies). While
        Redis is down, the last known leader carries on and the others stay silent."""
        if self.gateway is None:
            return True
        # 3 rounds, at least 5 s: a leader stalled by a busy event loop keeps its lease.
        ttl_ms = max(5000, int(self.interval * 3000))
        try:
            async with self.gateway.guard() as redis:
                leader = await redis.eval(_LEAD, 1, self.leader_key, self.origin, ttl_ms)
        except Exception as exc:  # RedisUnavailable included
            log.debug("alerts.leader_unknown", error=type(exc).__name__)
            return self._leader
        was, self._leader = self._leader, bool(leader)
        if self._leader and not was:
            log.info("alerts.leader", origin=self.origin)
        return self._leader

    async def _run(self) -> None:
        self._previous = self._snapshot()
        while True:
            await asyncio.sleep(self.interval)
            try:
                if await self.is_leader():
                    await self.evaluate()
                else:
                    self._previous = self._snapshot()  # ready to take over with fresh deltas
            except Exception:
                log.exception("alerts.evaluation_failed")

    def start(self) -> None:
        """Run in the background until ``close()`` (the runtime owns it)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="alerts")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_until_done(task)
        if self.gateway is not None and self._leader:
            # Hand over at once instead of after the lease expires.
            with contextlib.suppress(Exception):
                async with self.gateway.guard() as redis:
                    await redis.eval(_RESIGN, 1, self.leader_key, self.origin)
            self._leader = False
        closer = getattr(self.notify, "close", None)
        if closer is not None:
            await closer()


def build_evaluator(
    webhook_url: str,
    *,
    interval: float,
    cooldown: float,
    retries: int,
    thresholds: AlertThresholds | None = None,
    rules: Iterable[AlertRule] | None = None,
    gateway: RedisGateway | None = None,
) -> AlertEvaluator:
    """The evaluator the runtime starts when a webhook URL is configured."""
    chosen = list(rules) if rules is not None else default_rules(thresholds=thresholds)
    notifier = WebhookNotifier(webhook_url, retries=retries)
    return AlertEvaluator(chosen, notifier, interval=interval, cooldown=cooldown, gateway=gateway)


def evaluator_from_settings(
    settings: Settings, gateway: RedisGateway | None = None
) -> AlertEvaluator | None:
    """The ALERT_ settings as an evaluator, or None when no webhook URL is configured.
    With ``gateway``, only one process per Redis (the leader) evaluates and notifies."""
    url = settings.ALERT_WEBHOOK_URL.get_secret_value()
    if not url:
        return None
    return build_evaluator(
        url,
        interval=settings.ALERT_INTERVAL.total_seconds(),
        cooldown=settings.ALERT_COOLDOWN.total_seconds(),
        retries=settings.ALERT_WEBHOOK_RETRIES,
        thresholds=AlertThresholds.from_settings(settings),
        gateway=gateway,
    )
