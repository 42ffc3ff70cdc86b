"""kit.telemetry.alerts and health_score: rules over real Prometheus metrics, delivery to a
Slack-compatible webhook receiver on loopback, cool-down and resolved messages."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram

from surge.kit.breaker import BreakerConfig, BreakerFleet, BreakerRegistry, BreakerState
from surge.kit.embedded import free_port
from surge.kit.health import Health
from surge.kit.redis import RedisGateway
from surge.kit.runtime import Runtime
from surge.kit.telemetry.alerts import (
    AlertEvaluator,
    WebhookNotifier,
    default_rules,
    histogram_quantile,
    open_breakers,
    take_snapshot,
)
from surge.kit.telemetry.health_score import platform_health, platform_health_router
from surge.kit.telemetry.metrics import LATENCY_BUCKETS
from tests.fixtures.clock import Clock
from tests.fixtures.receivers import WebhookReceiver
from tests.fixtures.settings import make_settings

COOLDOWN = 300.0


class Metrics:
    """A private registry with the same metric names the app exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total", "x", ["method", "route", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "x",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def errors(self, n: int) -> None:
        self.requests.labels("GET", "/x", "500").inc(n)


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = await WebhookReceiver(fail_first=1).start()  # the first delivery must be retried
    yield server
    await server.stop()


def evaluator_for(metrics: Metrics, notify: WebhookNotifier, clock: Clock) -> AlertEvaluator:
    rules = [r for r in default_rules() if r.name in {"HighErrorRate", "HighResponseTime"}]
    return AlertEvaluator(
        rules,
        notify,
        cooldown=COOLDOWN,
        snapshot=lambda: take_snapshot(metrics.registry),
        clock=clock,
    )


class TestDelivery:
    async def test_fires_once_within_the_cooldown_then_resolves(
        self, receiver: WebhookReceiver
    ) -> None:
        metrics, clock = Metrics(), Clock(100.0)
        notifier = WebhookNotifier(
            receiver.url, retries=2, backoff=0.01, breakers=BreakerRegistry(), source="test"
        )
        evaluator = evaluator_for(metrics, notifier, clock)
        try:
            assert await evaluator.evaluate() == []  # baseline snapshot
            metrics.errors(50)
            clock.now += 15
            await evaluator.evaluate()
            assert len(receiver.received) == 1
            first = receiver.received[0]
            assert first["alert"] == {
                "name": "HighErrorRate",
                "status": "firing",
                "severity": "critical",
            }
            assert "[FIRING] HighErrorRate" in first["text"]
            assert receiver.attempts == 2  # one 500, then delivered

            for _ in range(3):  # still erroring, still within the cool-down: silence
                metrics.errors(50)
                clock.now += 15
                await evaluator.evaluate()
            assert len(receiver.received) == 1

            clock.now += 15  # no new errors: resolved, once
            await evaluator.evaluate()
            await evaluator.evaluate()
            assert [m["alert"]["status"] for m in receiver.received] == ["firing", "resolved"]
            assert "[RESOLVED] HighErrorRate" in receiver.received[1]["text"]

            # Flapping within the cool-down of the last message: neither fire nor resolve.
            metrics.errors(50)
            clock.now += 15
            await evaluator.evaluate()
            clock.now += 15
            await evaluator.evaluate()
            assert len(receiver.received) == 2

            # After the cool-down, a new episode is announced again.
            clock.now += COOLDOWN
            metrics.errors(50)
            await evaluator.evaluate()
            assert [m["alert"]["status"] for m in receiver.received] == [
                "firing",
                "resolved",
                "firing",
            ]
        finally:
            await evaluator.close()

    async def test_a_dead_webhook_opens_its_breaker_and_never_breaks_evaluation(self) -> None:
        registry = BreakerRegistry()
        notifier = WebhookNotifier(
            f"http://127.0.0.1:{free_port()}/hook", retries=1, backoff=0.01, breakers=registry
        )
        metrics, clock = Metrics(), Clock(100.0)
        evaluator = evaluator_for(metrics, notifier, clock)
        try:
            await evaluator.evaluate()
            for _ in range(4):  # four episodes, each past the cool-down
                metrics.errors(50)
                clock.now += COOLDOWN + 1
                await evaluator.evaluate()
                clock.now += COOLDOWN + 1
                await evaluator.evaluate()
            assert registry.get("alerts-webhook").state is BreakerState.OPEN
        finally:
            await evaluator.close()


class TestRules:
    async def test_p95_response_time_over_the_interval(self) -> None:
        metrics, clock = Metrics(), Clock(100.0)
        sent: list[str] = []

        async def notify(event: object) -> None:
            sent.append(getattr(event, "status", ""))

        rules = [r for r in default_rules() if r.name == "HighResponseTime"]
        evaluator = AlertEvaluator(
            rules, notify, snapshot=lambda: take_snapshot(metrics.registry), clock=clock
        )
        for _ in range(100):
            metrics.duration.labels("GET", "/x").observe(0.02)
        await evaluator.evaluate()
        assert sent == []  # fast so far
        for _ in range(100):
            metrics.duration.labels("GET", "/x").observe(2.0)
        await evaluator.evaluate()  # only the last interval counts: all 2 s
        assert sent == ["firing"]
        state = evaluator.states["HighResponseTime"]
        assert state.value is not None
        assert 1.0 < state.value <= 2.5

    def test_histogram_quantile_matches_prometheus(self) -> None:
        # 100 observations: 90 in (0, 0.1], 10 in (0.1, 1]. p95 = 0.1 + 0.9 * 5/10.
        assert histogram_quantile(0.95, {0.1: 90, 1.0: 100, float("inf"): 100}) == pytest.approx(
            0.55
        )
        assert histogram_quantile(0.95, {0.1: 0, float("inf"): 0}) is None

    async def test_open_breaker_rule_reads_the_breaker_gauge(self) -> None:
        registry = BreakerRegistry(default=BreakerConfig(minimum_calls=1, window_size=1))
        breaker = registry.get("alert-rule-probe")

        async def fail() -> None:
            raise RuntimeError("x")

        with pytest.raises(RuntimeError):
            await breaker.call(fail)
        value, detail = open_breakers(take_snapshot(), None)
        assert value is not None
        assert value >= 1
        assert "alert-rule-probe" in detail
        breaker.reset()
        _, detail = open_breakers(take_snapshot(), None)
        assert "alert-rule-probe" not in detail


class TestHealthScore:
    async def test_score_lists_what_lowers_it(self) -> None:
        health = Health(timeout=0.5)

        async def down() -> bool:
            return False

        async def up() -> bool:
            return True

        health.register("database", down)
        health.register("redis", up)
        registry = BreakerRegistry(default=BreakerConfig(minimum_calls=1, window_size=1))

        async def fail() -> None:
            raise RuntimeError("provider 502")

        with pytest.raises(RuntimeError):
            await registry.get("payments").call(fail)
        registry.get("email")
        result = await platform_health(health=health, breakers=registry, memory_threshold=1.0)
        assert result["score"] == 100 - 40 - 15
        assert result["status"] == "critical"
        assert [(i["source"], i["name"]) for i in result["issues"]] == [
            ("dependency", "database"),
            ("breaker", "payments"),
        ]
        registry.reset()
        health.register("database", up)
        healthy = await platform_health(health=health, breakers=registry, memory_threshold=1.0)
        assert healthy == {"score": 100, "status": "healthy", "issues": []}

    async def test_admin_route_serves_the_score(self) -> None:
        health = Health(timeout=0.5)

        async def down() -> bool:
            return False

        health.register("redis", down)
        app = FastAPI()
        app.include_router(platform_health_router(health, {}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = (await client.get("/api/admin/platform-health")).json()
        assert body["score"] <= 80
        assert {"source": "dependency", "name": "redis"}.items() <= body["issues"][0].items()


class TestLeadership:
    async def test_many_processes_send_one_message(
        self, server_urls: tuple[str, str], receiver: WebhookReceiver
    ) -> None:
        metrics = Metrics()
        receiver.fail_first = 0
        gateway = RedisGateway(server_urls[1])
        key = f"test:alerts:leader:{id(metrics)}"
        evaluators = [
            AlertEvaluator(
                [r for r in default_rules() if r.name == "HighErrorRate"],
                WebhookNotifier(receiver.url, breakers=BreakerRegistry(), source=f"p{i}"),
                interval=0.05,
                cooldown=COOLDOWN,
                snapshot=lambda: take_snapshot(metrics.registry),
                gateway=gateway,
                leader_key=key,
            )
            for i in range(3)
        ]
        try:
            assert [await e.is_leader() for e in evaluators] == [True, False, False]
            for evaluator in evaluators:
                evaluator.start()
            await asyncio.sleep(0.1)
            metrics.errors(100)
            async with asyncio.timeout(5):
                await receiver.arrived.wait()
            await asyncio.sleep(0.3)  # several more rounds: no process repeats it
            firing = [m for m in receiver.received if m["alert"]["status"] == "firing"]
            assert len(firing) == 1
            # ...and the "resolved" that follows comes from the same (leading) process.
            assert {m["attachments"][0]["fields"][3]["value"] for m in receiver.received} == {"p0"}
            # The leader stops: another one takes over at once.
            await evaluators[0].close()
            assert [await e.is_leader() for e in evaluators[1:]] == [True, False]
        finally:
            for evaluator in evaluators:
                await evaluator.close()
            await gateway.close()


class TestRuntimeWiring:
    async def test_runtime_runs_alerts_only_with_a_webhook(
        self, server_urls: tuple[str, str], receiver: WebhookReceiver
    ) -> None:
        with_hook = Runtime(make_settings(*server_urls, ALERT_WEBHOOK_URL=receiver.url))
        without = Runtime(make_settings(*server_urls))
        await with_hook.start()
        await without.start()
        try:
            assert isinstance(with_hook.extensions["alerts"], AlertEvaluator)
            assert "alerts" not in without.extensions
            assert isinstance(with_hook.extensions["breakers"], BreakerFleet)
        finally:
            await with_hook.stop()
            await without.stop()
        assert with_hook.extensions["alerts"]._task is None  # stopped with the runtime


def test_prometheus_rules_file_has_every_in_process_rule() -> None:
    """deploy/prometheus/alerts.yml and default_rules() describe the same alerts."""
    rules_file = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
    text = rules_file.read_text()
    exported = set(re.findall(r"^\s*- alert: (\w+)$", text, flags=re.MULTILINE))
    assert {rule.name for rule in default_rules()} <= exported
    for metric in (
        "http_request_duration_seconds_bucket",
        "http_requests_total",
        "surge_system_memory_used_ratio",
        "db_slow_queries_total",
        "breaker_state",
        "surge_jobs_queue_lag_seconds",
    ):
        assert metric in text, metric
