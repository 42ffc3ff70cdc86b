"""kit.http against real forward proxies on loopback, each leaving from its own 127.0.0.x
address, and a target that blocks chosen addresses (tests/fixtures/proxies.py, receivers.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from surge.kit.breaker import BreakerConfig, BreakerOpenError, BreakerRegistry
from surge.kit.embedded import free_port
from surge.kit.http import (
    OutboundClient,
    OutboundError,
    ProxyBlocked,
    ProxyPool,
)
from tests.fixtures.proxies import ForwardProxy, start_proxies
from tests.fixtures.receivers import BlockingTarget, MiniServer, Reply, Request

EGRESS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
COOLDOWN = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def target() -> AsyncIterator[BlockingTarget]:
    server = await BlockingTarget().start()
    yield server
    await server.stop()


@pytest.fixture
async def proxies() -> AsyncIterator[list[ForwardProxy]]:
    started = await start_proxies(EGRESS)
    yield started
    for proxy in started:
        await proxy.stop()


def pool_of(proxies: list[ForwardProxy], clock: Clock) -> ProxyPool:
    return ProxyPool([p.url for p in proxies], cooldown=COOLDOWN, clock=clock)


def by_ip(pool: ProxyPool, proxies: list[ForwardProxy], ip: str) -> dict[str, object]:
    proxy_id = f"127.0.0.1:{next(p.port for p in proxies if p.egress == ip)}"
    return next(s for s in pool.status() if s["id"] == proxy_id)


class TestProxyFailover:
    async def test_blocked_proxy_goes_inactive_and_the_request_succeeds_elsewhere(
        self, target: BlockingTarget, proxies: list[ForwardProxy]
    ) -> None:
        target.blocked = {"127.0.0.11"}
        clock = Clock()
        client = OutboundClient(proxies=pool_of(proxies, clock), breakers=BreakerRegistry())
        try:
            vias = []
            for _ in range(6):
                response = await client.get(target.url + "/login")
                assert response.status_code == 200
                vias.append(response.json()["via"])
            assert "127.0.0.11" not in vias
            assert set(vias) == {"127.0.0.12", "127.0.0.13"}
            assert target.seen.count("127.0.0.11") == 1  # tried once, then left alone
            status = by_ip(client.pool, proxies, "127.0.0.11")  # type: ignore[arg-type]
            assert status["active"] is False
            assert "PROXY_BLOCKED" in str(status["last_error"])
            proxy_id = str(status["id"])
            assert REGISTRY.get_sample_value("egress_proxy_active", {"proxy": proxy_id}) == 0
            blocked = {"proxy": proxy_id, "outcome": "blocked"}
            assert REGISTRY.get_sample_value("egress_proxy_requests_total", blocked) == 1
        finally:
            await client.close()

    async def test_inactive_proxy_comes_back_after_the_cooldown(
        self, target: BlockingTarget, proxies: list[ForwardProxy]
    ) -> None:
        target.blocked = {"127.0.0.11"}
        clock = Clock()
        pool = pool_of(proxies, clock)
        client = OutboundClient(proxies=pool, breakers=BreakerRegistry())
        try:
            for _ in range(3):
                assert (await client.get(target.url)).status_code == 200
            assert by_ip(pool, proxies, "127.0.0.11")["active"] is False

            # Cool-down over but still blocked: probed once, inactive again, request fine.
            clock.now += COOLDOWN
            seen_before = target.seen.count("127.0.0.11")
            response = await client.get(target.url)
            assert response.json()["via"] != "127.0.0.11"
            assert target.seen.count("127.0.0.11") == seen_before + 1
            assert by_ip(pool, proxies, "127.0.0.11")["active"] is False

            # Before the new cool-down ends it is not tried at all.
            clock.now += COOLDOWN / 2
            await client.get(target.url)
            assert target.seen.count("127.0.0.11") == seen_before + 1

            # The target stops blocking it: after the cool-down it carries traffic again.
            target.blocked.clear()
            clock.now += COOLDOWN / 2
            assert (await client.get(target.url)).json()["via"] == "127.0.0.11"
            assert by_ip(pool, proxies, "127.0.0.11")["active"] is True
            vias = {(await client.get(target.url)).json()["via"] for _ in range(6)}
            assert vias == set(EGRESS)
        finally:
            await client.close()

    async def test_a_block_page_counts_as_a_block(
        self, target: BlockingTarget, proxies: list[ForwardProxy]
    ) -> None:
        target.blocked = {"127.0.0.12"}
        target.block_page = True  # 200 with an "Access Denied" page, no 403
        pool = pool_of(proxies, Clock())
        client = OutboundClient(proxies=pool, breakers=BreakerRegistry())
        try:
            vias = {(await client.get(target.url)).json()["via"] for _ in range(4)}
            assert vias == {"127.0.0.11", "127.0.0.13"}
            assert by_ip(pool, proxies, "127.0.0.12")["active"] is False
        finally:
            await client.close()

    async def test_load_spreads_over_healthy_proxies(
        self, target: BlockingTarget, proxies: list[ForwardProxy]
    ) -> None:
        client = OutboundClient(proxies=pool_of(proxies, Clock()), breakers=BreakerRegistry())
        try:
            # Concurrent requests: least-in-flight spreads them over all three.
            responses = await asyncio.gather(*(client.get(target.url) for _ in range(9)))
            vias = [r.json()["via"] for r in responses]
            assert {ip: vias.count(ip) for ip in EGRESS} == dict.fromkeys(EGRESS, 3)
        finally:
            await client.close()

    async def test_every_proxy_blocked_raises_proxy_blocked(
        self, target: BlockingTarget, proxies: list[ForwardProxy]
    ) -> None:
        target.blocked = set(EGRESS)
        client = OutboundClient(proxies=pool_of(proxies, Clock()), breakers=BreakerRegistry())
        try:
            with pytest.raises(ProxyBlocked, match="PROXY_BLOCKED") as info:
                await client.post(target.url + "/orders", json={"n": 1})
            assert info.value.status_code == 503
            assert len(target.seen) == 3  # each proxy tried once, then none left
        finally:
            await client.close()


class TestCredentials:
    async def test_proxy_credentials_never_reach_logs_status_or_errors(
        self, target: BlockingTarget
    ) -> None:
        user, password = "egress-user", "pw-Xq81-secret"
        proxies = await start_proxies(EGRESS[:2], username=user, password=password)
        dead = f"http://{user}:{password}@127.0.0.1:{free_port()}"  # nobody listens
        target.blocked = {"127.0.0.11"}
        pool = ProxyPool([dead, *(p.url for p in proxies)], cooldown=COOLDOWN, max_failures=1)
        client = OutboundClient(proxies=pool, breakers=BreakerRegistry(), retries=0)
        try:
            with capture_logs() as logs:
                for _ in range(3):
                    response = await client.get(target.url)
                    assert response.json()["via"] == "127.0.0.12"
                target.blocked.add("127.0.0.12")
                with pytest.raises(ProxyBlocked) as info:
                    await client.get(target.url)
            assert proxies[0].handled
            assert proxies[0].refused_auth == 0
            events = {entry["event"] for entry in logs}
            assert {"http.proxy.blocked", "http.proxy.inactive"} <= events
            dumped = repr(logs) + repr(pool.status()) + str(info.value) + repr(pool.proxies)
            assert password not in dumped
            assert user not in dumped
        finally:
            await client.close()
            for proxy in proxies:
                await proxy.stop()

    async def test_a_proxy_refusing_our_credentials_is_skipped(
        self, target: BlockingTarget
    ) -> None:
        good = await ForwardProxy("127.0.0.11", username="u", password="right").start()
        bad = await ForwardProxy("127.0.0.12", username="u", password="right").start()
        bad_url = bad.url.replace(":right@", ":wrong@")
        pool = ProxyPool([bad_url, good.url], cooldown=COOLDOWN, max_failures=1)
        client = OutboundClient(proxies=pool, breakers=BreakerRegistry(), retries=0)
        try:
            for _ in range(3):
                assert (await client.get(target.url)).json()["via"] == "127.0.0.11"
            assert bad.refused_auth == 1
            assert pool.status()[0]["active"] is False
            assert "wrong" not in repr(pool.status())
        finally:
            await client.close()
            await good.stop()
            await bad.stop()

    async def test_connect_tunnel_leaves_from_the_proxy_address(
        self, target: BlockingTarget, proxies: list[ForwardProxy]
    ) -> None:
        port = target.url.rsplit(":", 1)[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", proxies[2].port)
        writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = await reader.read()
        writer.close()
        assert b'"via": "127.0.0.13"' in body


class Flaky:
    """A target answering 503 ``failures`` times, then 200."""

    def __init__(self, failures: int, status: int = 503) -> None:
        self.failures = failures
        self.status = status
        self.calls = 0
        self.server = MiniServer(self.handle)

    async def handle(self, request: Request) -> Reply:
        self.calls += 1
        if self.calls <= self.failures:
            return Reply(self.status, b"{}")
        return Reply(200, b'{"ok": true}')


class TestRetriesAndBreaker:
    async def test_idempotent_calls_retry_with_backoff_post_does_not(self) -> None:
        flaky = Flaky(failures=2)
        await flaky.server.start()
        client = OutboundClient(breakers=BreakerRegistry(), retries=2, backoff=0.01)
        try:
            assert (await client.get(flaky.server.url)).status_code == 200
            assert flaky.calls == 3
            flaky.calls, flaky.failures = 0, 1
            assert (await client.post(flaky.server.url, json={})).status_code == 503
            assert flaky.calls == 1  # a POST is never replayed
            flaky.calls = 0
            ok = await client.post(flaky.server.url, json={}, idempotent=True)
            assert ok.status_code == 200  # ...unless the caller says it is safe (idempotency key)
        finally:
            await client.close()
            await flaky.server.stop()

    async def test_transport_error_after_retries_raises(self) -> None:
        client = OutboundClient(breakers=BreakerRegistry(), retries=1, backoff=0.01)
        try:
            with pytest.raises(OutboundError, match="2 attempt"):
                await client.get(f"http://127.0.0.1:{free_port()}/")
        finally:
            await client.close()

    async def test_breaker_per_target_opens_and_fails_fast(self) -> None:
        flaky = Flaky(failures=1000, status=500)
        await flaky.server.start()
        registry = BreakerRegistry()
        # Thresholds are the caller's; what counts (5xx, transport errors) is the client's.
        config = BreakerConfig(minimum_calls=3, window_size=3, record=())
        client = OutboundClient(breakers=registry, retries=0, breaker_config=config)
        try:
            for _ in range(3):
                assert (await client.get(flaky.server.url)).status_code == 500
            with pytest.raises(BreakerOpenError):
                await client.get(flaky.server.url)
            assert flaky.calls == 3  # the fourth call never left the process
            assert [s["name"] for s in registry.status()] == [f"http:127.0.0.1:{flaky.server.port}"]
        finally:
            await client.close()
            await flaky.server.stop()
