"""kit.ratelimit through the app: middleware + RouteLimit, headers, 429 problem, one Redis
round trip for three limits, and Redis stopped → local fallback → shared limits again.

Uses its own PostgreSQL (no migrations needed) and its own Redis per test that stops it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis_async
from fastapi import Depends, FastAPI
from prometheus_client import REGISTRY

from surge.app import create_app
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis
from surge.kit.ratelimit import MemoClientIp, RateLimiter, RouteLimit, Subject
from surge.kit.telemetry import metrics
from surge.kit.web.client_ip import ClientIpResolver
from tests.fixtures.clients import app_client
from tests.fixtures.servers import start_postgres, start_redis
from tests.fixtures.settings import make_settings

POLICIES: list[dict[str, Any]] = [
    {"name": "anon", "limit": 5, "period": "PT15M", "per": "ip", "tiers": ["anonymous"],
     "routes": ["/t/*"]},
    {"name": "tier-free", "limit": 10, "period": "PT15M", "per": "subject", "tiers": ["free"]},
    {"name": "tier-pro", "limit": 20, "period": "PT15M", "per": "subject", "tiers": ["pro"]},
    {"name": "ip-wide", "limit": 1000, "period": "PT1M", "per": "ip"},
    {"name": "endpoint-2", "limit": 2, "period": "PT1M", "scope": "route"},
    {"name": "trial-rule", "limit": 1, "period": "PT1M", "routes": ["/t/trial"],
     "shadow": True},
    {"name": "guarded", "limit": 100, "period": "PT1M", "routes": ["/t/guarded"],
     "failure": "closed"},
    {"name": "lenient", "limit": 1, "period": "PT1M", "routes": ["/t/lenient"],
     "failure": "open"},
]  # fmt: skip


def identify_from_header(scope: Any) -> Subject | None:
    """Test stand-in for the identity module: ``X-Test-User: id:tier``."""
    for name, value in scope["headers"]:
        if name == b"x-test-user":
            user, tier = value.decode().split(":")
            return Subject(user, tier)
    return None


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = start_postgres(tmp_path_factory.mktemp("ratelimit-pg"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = start_redis(tmp_path_factory.mktemp("ratelimit-http-redis"))
    yield server
    server.stop()


def build_app(postgres: EmbeddedPostgres, redis_url: str, **overrides: object) -> FastAPI:
    values: dict[str, object] = {
        "RATELIMIT_ENABLED": True,
        "RATELIMIT_POLICIES": POLICIES,
        "RATELIMIT_KEY_PREFIX": f"rl-{uuid.uuid4().hex[:8]}:",
        "RATELIMIT_LOCAL_PROCESSES": 2,
        **overrides,
    }
    settings = make_settings(postgres.url, redis_url, **values)
    app = create_app(settings)
    app.state.runtime.extensions["ratelimit"].identify = identify_from_header

    @app.get("/t/open")
    async def open_route() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/t/expensive", dependencies=[Depends(RouteLimit("endpoint-2"))])
    async def expensive() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/t/heavy/{item}", dependencies=[Depends(RouteLimit("endpoint-2", cost=2))])
    async def heavy(item: int) -> dict[str, int]:
        return {"item": item}

    for path in ("/t/trial", "/t/guarded", "/t/lenient"):
        app.add_api_route(path, open_route, methods=["GET"])
    return app


def limiter_of(app: FastAPI) -> RateLimiter:
    limiter: RateLimiter = app.state.runtime.extensions["ratelimit"]
    return limiter


@pytest.fixture
async def app(postgres: EmbeddedPostgres, shared_redis: EmbeddedRedis) -> FastAPI:
    return build_app(postgres, shared_redis.url)


@pytest.fixture
async def web(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(app):
        yield client


def free(user: str) -> dict[str, str]:
    return {"x-test-user": f"{user}:free"}


class TestHeadersAndProblem:
    async def test_anonymous_n_allowed_then_429_problem(self, web: httpx.AsyncClient) -> None:
        responses = [await web.get("/t/open") for _ in range(6)]
        assert [r.status_code for r in responses] == [200] * 5 + [429]
        first = responses[0]
        assert first.headers["ratelimit-policy"] == '"anon";q=5;w=900, "ip-wide";q=1000;w=60'
        assert first.headers["ratelimit"].startswith('"anon";r=4;t=180, "ip-wide";r=999;t=1')
        assert responses[4].headers["ratelimit"].startswith('"anon";r=0;t=900')

        denied = responses[5]
        assert denied.headers["content-type"] == "application/problem+json"
        assert denied.headers["retry-after"] == "180"  # 900 s / 5 = one unit back per 180 s
        assert denied.headers["x-request-id"]
        assert denied.headers["ratelimit"].startswith('"anon";r=0;t=900')
        body = denied.json()
        assert body["status"] == 429
        assert body["title"] == "Too Many Requests"
        assert body["type"].endswith("/too-many-requests")
        assert body["instance"] == "/t/open"
        assert body["policies"] == ["anon"]
        assert body["retry_after"] == 180

    async def test_health_probes_are_never_limited(self, web: httpx.AsyncClient) -> None:
        for _ in range(6):
            await web.get("/t/open")
        assert (await web.get("/t/open")).status_code == 429
        for path in ("/livez", "/readyz", "/metrics", "/api/health"):
            response = await web.get(path)
            assert response.status_code != 429, path
            assert "ratelimit" not in response.headers, path


class TestWhoPays:
    async def test_each_tier_has_its_own_budget(self, web: httpx.AsyncClient) -> None:
        ann = [(await web.get("/t/open", headers=free("ann"))).status_code for _ in range(11)]
        bob = [
            (await web.get("/t/open", headers={"x-test-user": "bob:pro"})).status_code
            for _ in range(21)
        ]
        assert ann == [200] * 10 + [429]
        assert bob == [200] * 20 + [429]

    async def test_forwarded_for_from_a_trusted_proxy_separates_clients(
        self, web: httpx.AsyncClient
    ) -> None:
        # the test client's peer is 127.0.0.1, a trusted proxy by default
        def via(ip: str) -> dict[str, str]:
            return {"x-forwarded-for": f"{ip}, 127.0.0.1"}

        first = [
            (await web.get("/t/open", headers=via("203.0.113.7"))).status_code for _ in range(6)
        ]
        other = (await web.get("/t/open", headers=via("203.0.113.8"))).status_code
        assert first == [200] * 5 + [429]
        assert other == 200

    async def test_ipv6_callers_share_their_slash_64(self, web: httpx.AsyncClient) -> None:
        """One host usually owns a whole /64: rotating the low bits must not buy a budget."""

        def via(ip: str) -> dict[str, str]:
            return {"x-forwarded-for": ip}

        codes = [
            (await web.get("/t/open", headers=via(f"2001:db8:1:2::{i:x}"))).status_code
            for i in range(1, 7)
        ]
        assert codes == [200] * 5 + [429]
        assert (await web.get("/t/open", headers=via("2001:db8:1:3::1"))).status_code == 200

    async def test_route_limit_spends_nothing_else_when_it_denies(
        self, app: FastAPI, web: httpx.AsyncClient
    ) -> None:
        codes = [(await web.get("/t/expensive", headers=free("cy"))).status_code for _ in range(4)]
        assert codes == [200, 200, 429, 429]
        denied = await web.get("/t/expensive", headers=free("cy"))
        assert denied.json()["policies"] == ["endpoint-2"]
        assert (await limiter_of(app).state("tier-free", "id:cy")).remaining == 8
        # the endpoint budget is per route: another route is untouched
        assert (await web.get("/t/open", headers=free("cy"))).status_code == 200

    async def test_weighted_route_cost(self, web: httpx.AsyncClient) -> None:
        codes = [(await web.get(f"/t/heavy/{i}", headers=free("di"))).status_code for i in range(2)]
        assert codes == [200, 429]  # cost 2 of a budget of 2, across any {item}

    async def test_shadow_policy_never_blocks(self, web: httpx.AsyncClient) -> None:
        labels = {"policy": "trial-rule", "outcome": "shadow_denied", "store": "redis"}
        metrics.flush_all()  # decisions are counted in batches (ADR 0023)
        before = REGISTRY.get_sample_value("ratelimit_decisions_total", labels) or 0.0
        codes = [(await web.get("/t/trial", headers=free("ed"))).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        metrics.flush_all()
        after = REGISTRY.get_sample_value("ratelimit_decisions_total", labels) or 0.0
        assert after - before == 2


class TestWithoutTheMiddleware:
    async def test_route_limit_alone_still_limits(
        self, postgres: EmbeddedPostgres, shared_redis: EmbeddedRedis
    ) -> None:
        """surge.kit in another service: no global middleware, RouteLimit checks by itself."""
        app = build_app(postgres, shared_redis.url, RATELIMIT_ENABLED=False)
        async for web in app_client(app):
            responses = [await web.get("/t/expensive", headers=free("hal")) for _ in range(3)]
            assert [r.status_code for r in responses] == [200, 200, 429]
            assert responses[0].headers["ratelimit-policy"] == '"endpoint-2";q=2;w=60'
            assert responses[2].headers["retry-after"] == "30"
            assert responses[2].json()["policies"] == ["endpoint-2"]
            # no global policy applies without the middleware
            assert [(await web.get("/t/open")).status_code for _ in range(7)] == [200] * 7

    async def test_failing_identify_hook_means_anonymous_not_500(self, app: FastAPI) -> None:
        def broken(scope: Any) -> Subject | None:
            raise RuntimeError("token store down")

        limiter_of(app).identify = broken
        async for web in app_client(app):
            codes = [(await web.get("/t/open", headers=free("ivy"))).status_code for _ in range(6)]
            assert codes == [200] * 5 + [429]  # the anonymous per-IP budget


class Monitor:
    """Client commands Redis receives, from ``MONITOR`` (commands run *inside* a Lua script
    show up as ``lua`` and are not round trips)."""

    def __init__(self, url: str) -> None:
        self.client = redis_async.Redis.from_url(url)
        self.marker = redis_async.Redis.from_url(url)
        self.commands: list[str] = []

    async def __aenter__(self) -> Monitor:
        await self.marker.ping()  # connect now, so its handshake is not in the sample
        self._monitor = self.client.monitor()
        await self._monitor.__aenter__()  # type: ignore[no-untyped-call]
        return self

    async def collect_until_marker(self) -> list[str]:
        await self.marker.echo("end-of-sample")
        while True:
            entry = await self._monitor.next_command()
            if entry.get("client_type") == "lua":
                continue
            command = str(entry["command"])
            if "end-of-sample" in command:
                return self.commands
            self.commands.append(command.split(" ", maxsplit=1)[0].upper())

    async def __aexit__(self, *exc: object) -> None:
        await self._monitor.__aexit__(*exc)  # type: ignore[no-untyped-call]
        await self.client.aclose()
        await self.marker.aclose()


class TestRoundTrips:
    async def test_three_limits_cost_one_round_trip(
        self, postgres: EmbeddedPostgres, tmp_path: Path
    ) -> None:
        """tier + IP + endpoint limit on one request: exactly one Redis command per request."""
        server = start_redis(tmp_path / "redis")
        app = build_app(postgres, server.url)
        try:
            async for web in app_client(app):
                first = await web.get("/t/expensive", headers=free("fay"))  # loads the script
                assert first.status_code == 200
                async with Monitor(server.url) as monitor:
                    response = await web.get("/t/expensive", headers=free("fay"))
                    denied = await web.get("/t/expensive", headers=free("fay"))
                    commands = await monitor.collect_until_marker()
                assert response.status_code == 200
                assert denied.status_code == 429
                policies = response.headers["ratelimit-policy"]
                assert [item.split(";")[0] for item in policies.split(", ")] == [
                    '"tier-free"', '"ip-wide"', '"endpoint-2"',
                ]  # fmt: skip
                assert commands == ["EVALSHA", "EVALSHA"]  # one round trip per request
        finally:
            server.stop()


class TestRedisDown:
    async def test_local_fallback_then_shared_limits_again(
        self, postgres: EmbeddedPostgres, tmp_path: Path
    ) -> None:
        server = start_redis(tmp_path / "redis")
        app = build_app(postgres, server.url)
        limiter = limiter_of(app)
        back = asyncio.Event()
        limiter.gateway.on_change(lambda up: back.set() if up else None)
        try:
            async for web in app_client(app):
                assert [(await web.get("/t/open")).status_code for _ in range(2)] == [200, 200]
                server.stop()

                # anon is 5 / 15 min for the fleet; with 2 processes this one allows 2
                codes = [(await web.get("/t/open")).status_code for _ in range(4)]
                assert codes == [200, 200, 429, 429]
                assert not limiter.gateway.is_up
                assert REGISTRY.get_sample_value("ratelimit_local_fallback") == 1.0
                local = await web.get("/t/open")
                assert local.headers["ratelimit-policy"].startswith('"anon";q=5;w=900')
                # fail-closed policy: 503 (not a client fault); fail-open: unmetered
                guarded = await web.get("/t/guarded", headers=free("gil"))
                assert guarded.status_code == 503
                assert guarded.headers["content-type"] == "application/problem+json"
                lenient = [
                    (await web.get("/t/lenient", headers=free("gil"))).status_code for _ in range(3)
                ]
                assert lenient == [200, 200, 200]

                server.start()  # same port, empty: Redis only accelerates
                await asyncio.wait_for(back.wait(), timeout=15)
                assert REGISTRY.get_sample_value("ratelimit_local_fallback") == 0.0
                codes = [(await web.get("/t/open")).status_code for _ in range(6)]
                assert codes == [200] * 5 + [429]  # the fleet's 5 again, not this process' 2
                assert (await web.get("/t/lenient", headers=free("gil"))).status_code == 200
                assert (await web.get("/t/lenient", headers=free("gil"))).status_code == 429
        finally:
            server.stop()


class TestClientIp:
    @pytest.mark.parametrize(
        ("peer", "xff", "expected"),
        [
            ("127.0.0.1", "198.51.100.1", "198.51.100.1"),
            (
                "127.0.0.1",
                "6.6.6.6, 198.51.100.1",
                "198.51.100.1",
            ),  # left part is the client's say-so
            ("127.0.0.1", "6.6.6.6, 198.51.100.1, 10.0.0.5", "198.51.100.1"),  # trusted hop skipped
            ("198.51.100.9", "1.2.3.4", "198.51.100.9"),  # untrusted peer: header ignored
            ("127.0.0.1", "not-an-ip", "127.0.0.1"),
            ("127.0.0.1", None, "127.0.0.1"),
            ("127.0.0.1", "::ffff:198.51.100.3", "198.51.100.3"),
        ],
    )
    def test_forwarded_for_only_from_trusted_proxies(
        self, peer: str, xff: str | None, expected: str
    ) -> None:
        headers = [(b"x-forwarded-for", xff.encode())] if xff else []
        scope = {"client": (peer, 5000), "headers": headers}
        # the middleware's memoising resolver gives the same answer, first time and from memory
        memo = MemoClientIp(["127.0.0.1", "10.0.0.0/8"])
        assert ClientIpResolver(["127.0.0.1", "10.0.0.0/8"])(scope) == expected
        assert [memo(scope), memo(scope)] == [expected, expected]

    def test_memo_is_bounded_and_keyed_by_the_header(self) -> None:
        memo = MemoClientIp(["127.0.0.1"], size=8)
        for i in range(20):
            scope = {
                "client": ("127.0.0.1", 1),
                "headers": [(b"x-forwarded-for", f"10.9.0.{i}".encode())],
            }
            assert memo(scope) == f"10.9.0.{i}"
        assert len(memo._memo) <= 8
        two_headers = [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"198.51.100.1")]
        assert memo({"client": ("127.0.0.1", 1), "headers": two_headers}) == "198.51.100.1"
