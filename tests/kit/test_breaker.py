"""kit.breaker: transitions under a controlled clock, classification, registry, admin
endpoints, and fleet-wide opening through real Redis (another OS process trips the breaker)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from surge.kit.breaker import (
    Breaker,
    BreakerConfig,
    BreakerFleet,
    BreakerOpenError,
    BreakerRegistry,
    BreakerState,
    UpstreamError,
    WindowType,
    breaker_router,
)
from surge.kit.errors import DependencyUnavailable
from surge.kit.redis import RedisGateway
from surge.kit.web.problem import install_problem_handlers
from tests.fixtures.servers import ROOT, start_redis


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Boom(Exception):
    pass


class Harmless(Exception):
    pass


def state_of(breaker: Breaker) -> BreakerState:
    """The state, read fresh (stops mypy from narrowing a property across calls)."""
    return breaker.state


async def ok() -> str:
    return "ok"


async def fail() -> str:
    raise Boom("upstream said no")


def make(clock: Clock, **overrides: object) -> Breaker:
    config = BreakerConfig(
        **{  # type: ignore[arg-type]
            "failure_rate": 0.5,
            "window_size": 10,
            "minimum_calls": 4,
            "open_duration": 30.0,
            "half_open_calls": 2,
            "slow_call_duration": 1.0,
            "ignore": (Harmless,),
            **overrides,
        }
    )
    return Breaker("test", config, clock=clock)


async def failing(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            await breaker.call(fail)


class TestTransitions:
    async def test_stays_closed_below_minimum_calls(self) -> None:
        breaker = make(Clock())
        await failing(breaker, 3)  # 3/3 failed but the window needs 4 calls to judge
        assert state_of(breaker) is BreakerState.CLOSED

    async def test_opens_at_the_failure_rate_threshold(self) -> None:
        breaker = make(Clock())
        await breaker.call(ok)
        await breaker.call(ok)
        await failing(breaker, 1)
        assert state_of(breaker) is BreakerState.CLOSED  # 1/3, below minimum anyway
        await failing(breaker, 1)  # 2/4 = 50 % >= 50 %
        assert state_of(breaker) is BreakerState.OPEN

    async def test_open_rejects_fast_without_calling(self) -> None:
        clock = Clock()
        breaker = make(clock)
        await failing(breaker, 4)
        called = False

        async def spy() -> None:
            nonlocal called
            called = True

        clock.advance(10)
        with pytest.raises(BreakerOpenError) as info:
            await breaker.call(spy)
        assert not called
        assert info.value.retry_after == pytest.approx(20.0)
        assert info.value.headers["Retry-After"] == "20"
        assert isinstance(info.value, UpstreamError)
        assert isinstance(info.value, DependencyUnavailable)

    async def test_half_open_lets_n_trials_then_closes(self) -> None:
        clock = Clock()
        breaker = make(clock)
        await failing(breaker, 4)
        clock.advance(30)
        assert state_of(breaker) is BreakerState.HALF_OPEN
        release = asyncio.Event()

        async def slow_ok() -> str:
            await release.wait()
            return "ok"

        trials = [asyncio.create_task(breaker.call(slow_ok)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(BreakerOpenError):  # a third concurrent call is refused
            await breaker.call(ok)
        release.set()
        assert await asyncio.gather(*trials) == ["ok", "ok"]
        assert state_of(breaker) is BreakerState.CLOSED
        assert breaker.status()["window"]["calls"] == 0  # a fresh window after closing

    async def test_half_open_failure_reopens(self) -> None:
        clock = Clock()
        breaker = make(clock)
        await failing(breaker, 4)
        clock.advance(30)
        await breaker.call(ok)
        await failing(breaker, 1)  # 1/2 trials failed >= 50 %
        assert state_of(breaker) is BreakerState.OPEN
        clock.advance(29)
        assert state_of(breaker) is BreakerState.OPEN
        clock.advance(1)
        assert state_of(breaker) is BreakerState.HALF_OPEN

    async def test_slow_calls_open_it(self) -> None:
        clock = Clock()
        breaker = make(clock, slow_call_rate=0.75)

        async def slow() -> str:
            clock.advance(2)  # the call "takes" 2 s > slow_call_duration 1 s
            return "late"

        for _ in range(3):
            assert await breaker.call(slow) == "late"
        assert state_of(breaker) is BreakerState.CLOSED
        await breaker.call(ok)
        assert state_of(breaker) is BreakerState.CLOSED  # 3/4 slow = 75 % — opens on the next slow
        await breaker.call(slow)
        assert state_of(breaker) is BreakerState.OPEN

    async def test_count_window_forgets_old_calls(self) -> None:
        breaker = make(Clock(), window_size=4)
        await failing(breaker, 1)
        for _ in range(4):
            await breaker.call(ok)  # the failure slides out of the 4-call window
        await failing(breaker, 1)
        assert breaker.status()["window"] == {"calls": 4, "failures": 1, "slow": 0}
        assert state_of(breaker) is BreakerState.CLOSED

    async def test_time_window_forgets_old_seconds(self) -> None:
        clock = Clock()
        breaker = make(clock, window_type=WindowType.TIME, window_size=10)
        await failing(breaker, 3)
        clock.advance(11)  # those three are now outside the 10 s window
        await breaker.call(ok)
        await breaker.call(ok)
        await breaker.call(ok)
        await failing(breaker, 1)  # 1/4
        assert state_of(breaker) is BreakerState.CLOSED
        await failing(breaker, 1)  # 2/5 < 50 %
        assert state_of(breaker) is BreakerState.CLOSED
        await failing(breaker, 1)  # 3/6 = 50 %
        assert state_of(breaker) is BreakerState.OPEN

    async def test_forced_open_holds_until_reset(self) -> None:
        clock = Clock()
        breaker = make(clock)
        breaker.force_open()
        clock.advance(10_000)
        with pytest.raises(BreakerOpenError) as info:
            await breaker.call(ok)
        assert info.value.headers["Retry-After"] == "60"
        assert breaker.status()["forced"] is True
        breaker.reset()
        assert await breaker.call(ok) == "ok"


class TestClassificationAndFallback:
    async def test_ignored_exceptions_pass_unrecorded(self) -> None:
        breaker = make(Clock())

        async def harmless() -> None:
            raise Harmless("404 is not an outage")

        for _ in range(10):
            with pytest.raises(Harmless):
                await breaker.call(harmless)
        assert state_of(breaker) is BreakerState.CLOSED
        assert breaker.status()["window"]["calls"] == 0

    async def test_record_limits_what_counts(self) -> None:
        breaker = make(Clock(), record=(TimeoutError,))
        await failing(breaker, 6)  # Boom is not a TimeoutError
        assert state_of(breaker) is BreakerState.CLOSED

    async def test_fallback_answers_failures_and_rejections(self) -> None:
        seen: list[str] = []

        async def fallback(exc: BaseException) -> str:
            seen.append(type(exc).__name__)
            return "cached"

        breaker = Breaker(
            "fb", BreakerConfig(minimum_calls=2, window_size=2), fallback=fallback, clock=Clock()
        )
        assert await breaker.call(fail) == "cached"
        assert await breaker.call(fail) == "cached"
        assert state_of(breaker) is BreakerState.OPEN
        assert await breaker.call(ok) == "cached"
        assert seen == ["Boom", "Boom", "BreakerOpenError"]

    async def test_decorator_and_guard(self) -> None:
        clock = Clock()
        breaker = make(clock)

        @breaker
        async def add(a: int, b: int) -> int:
            return a + b

        assert await add(2, 3) == 5
        for _ in range(3):  # 3 failures of 4 calls
            with pytest.raises(Boom):
                async with breaker.guard():
                    raise Boom("x")
        assert state_of(breaker) is BreakerState.OPEN
        with pytest.raises(BreakerOpenError):
            await add(1, 1)


class TestRegistryAndAdmin:
    async def test_registry_shares_one_breaker_per_name_and_resets(self) -> None:
        clock = Clock()
        registry = BreakerRegistry(
            profiles={"payments": BreakerConfig(minimum_calls=2, window_size=2)}, clock=clock
        )
        payments = registry.get("payments")
        assert registry.get("payments") is payments
        assert registry.get("email").config.minimum_calls == BreakerConfig().minimum_calls
        await failing(payments, 2)
        assert [s["state"] for s in registry.status()] == ["closed", "open"]
        assert registry.reset("payments") == ["payments"]
        assert state_of(payments) is BreakerState.CLOSED
        with pytest.raises(KeyError):
            registry.reset("nope")

    async def test_admin_router_lists_and_resets(self) -> None:
        registry = BreakerRegistry(default=BreakerConfig(minimum_calls=1, window_size=1))
        await failing(registry.get("upstream"), 1)
        app = FastAPI()
        install_problem_handlers(app)
        app.include_router(breaker_router(registry))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            listed = (await client.get("/api/admin/circuit-breakers")).json()
            assert listed["breakers"][0]["name"] == "upstream"
            assert listed["breakers"][0]["state"] == "open"
            assert listed["breakers"][0]["last_error"] == "Boom: upstream said no"
            reset = await client.post("/api/admin/circuit-breakers/reset?name=upstream")
            assert reset.json()["breakers"][0]["state"] == "closed"
            missing = await client.post("/api/admin/circuit-breakers/reset?name=nope")
            assert missing.status_code == 404
            assert missing.headers["content-type"].startswith("application/problem+json")


# ---- fleet-wide state through real Redis ------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from surge.kit.breaker import BreakerConfig, BreakerFleet, BreakerRegistry
    from surge.kit.redis import RedisGateway

    async def main() -> None:
        gateway = RedisGateway(sys.argv[1])
        registry = BreakerRegistry(default=BreakerConfig(minimum_calls=2, window_size=2,
                                                         open_duration=float(sys.argv[2])))
        fleet = BreakerFleet(registry, gateway, quorum=int(sys.argv[3]))
        await fleet.start()
        breaker = registry.get("upstream")

        async def fail() -> None:
            raise RuntimeError("down")

        for _ in range(2):
            try:
                await breaker.call(fail)
            except RuntimeError:
                pass
        assert breaker.state.value == "open"
        while fleet._pending:
            await asyncio.sleep(0.01)
        print("tripped", flush=True)
        await fleet.close()
        await gateway.close()

    asyncio.run(main())
    """
)


def trip_in_another_process(redis_url: str, open_s: float = 30.0, quorum: int = 1) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, redis_url, str(open_s), str(quorum)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "tripped" in done.stdout


async def wait_for_state(breaker: Breaker, state: BreakerState, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while breaker.state is not state:  # noqa: ASYNC110 - state set by another process
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of our own: these tests need Redis only, not the session's PostgreSQL."""
    server = start_redis(tmp_path_factory.mktemp("breaker-redis"))
    yield server.url
    server.stop()


class TestFleet:
    async def test_another_process_opening_opens_ours(self, redis_url: str) -> None:
        gateway = RedisGateway(redis_url)
        registry = BreakerRegistry()
        ours = registry.get("upstream")
        fleet = BreakerFleet(registry, gateway)
        await fleet.start()
        try:
            await fleet.ready()
            await asyncio.to_thread(trip_in_another_process, redis_url)
            await wait_for_state(ours, BreakerState.OPEN)
            assert 20 < ours.remaining_open() <= 30
            with pytest.raises(BreakerOpenError):
                await ours.call(ok)
            # An admin reset here closes it across the fleet too (and clears the key).
            registry.reset("upstream")
            await fleet.settled()
            late = BreakerRegistry()
            late.get("upstream")
            late_fleet = BreakerFleet(late, gateway)
            await late_fleet.start()
            assert late.get("upstream").state is BreakerState.CLOSED
            await late_fleet.close()
        finally:
            await fleet.close()
            await gateway.close()

    async def test_a_process_started_later_reads_the_open_state(self, redis_url: str) -> None:
        await asyncio.to_thread(trip_in_another_process, redis_url, 30.0)
        gateway = RedisGateway(redis_url)
        registry = BreakerRegistry()
        breaker = registry.get("upstream")
        fleet = BreakerFleet(registry, gateway)
        await fleet.start()
        try:
            assert state_of(breaker) is BreakerState.OPEN
        finally:
            registry.reset()
            await fleet.settled()
            await fleet.close()
            await gateway.close()

    async def test_quorum_needs_enough_processes(self, redis_url: str) -> None:
        gateway = RedisGateway(redis_url)
        registry = BreakerRegistry()
        ours = registry.get("quorum-target")
        fleet = BreakerFleet(registry, gateway, quorum=2, prefix="test:quorum:")
        await fleet.start()
        try:
            # Two other "processes" (separate fleets, separate origins) trip one after the other.
            others = []
            for _ in range(2):
                reg = BreakerRegistry(default=BreakerConfig(minimum_calls=1, window_size=1))
                other = BreakerFleet(reg, gateway, quorum=2, prefix="test:quorum:")
                await other.start()
                others.append(other)
                await failing(reg.get("quorum-target"), 1)
                await other.settled()  # its Redis report is out
                await asyncio.sleep(0.05)
                if len(others) == 1:
                    assert state_of(ours) is BreakerState.CLOSED  # one sick process is not enough
            await wait_for_state(ours, BreakerState.OPEN)
            for other in others:
                await other.close()
        finally:
            await fleet.close()
            await gateway.close()

    @pytest.mark.chaos
    async def test_redis_down_keeps_each_process_local(self, tmp_path: Path) -> None:
        server = start_redis(tmp_path / "redis")
        gateway = RedisGateway(server.url, connect_timeout=0.2, socket_timeout=0.2)
        registry = BreakerRegistry(default=BreakerConfig(minimum_calls=2, window_size=2))
        fleet = BreakerFleet(registry, gateway)
        breaker = registry.get("upstream")
        await fleet.start()
        try:
            server.stop()
            await gateway.ping()  # the gateway notices Redis is gone
            assert not gateway.is_up
            async with asyncio.timeout(1):  # no call waits on Redis
                await failing(breaker, 2)
                with pytest.raises(BreakerOpenError):
                    await breaker.call(ok)
                await asyncio.sleep(0.05)
            assert state_of(breaker) is BreakerState.OPEN
        finally:
            await fleet.close()
            await gateway.close()
            server.stop()


async def test_admin_endpoints_in_the_app_require_an_admin(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/admin/circuit-breakers")).status_code == 401
    assert (await client.post("/api/admin/circuit-breakers/reset")).status_code == 401
    assert (await client.get("/api/admin/platform-health")).status_code == 401


class TestEventsAndMetrics:
    async def test_listeners_and_prometheus_see_every_outcome(self) -> None:
        from prometheus_client import REGISTRY

        clock = Clock()
        breaker = Breaker(
            "metrics-probe",
            BreakerConfig(
                failure_rate=0.4, minimum_calls=5, window_size=5, half_open_calls=1, open_duration=5
            ),
            clock=clock,
        )
        seen: list[tuple[str, str]] = []
        breaker.add_listener(lambda b, old, new: seen.append((old.value, new.value)))

        def sample(name: str, **labels: str) -> float:
            breaker.flush_metrics()
            value = REGISTRY.get_sample_value(name, {"breaker": "metrics-probe", **labels})
            return value or 0.0

        before = {o: sample("breaker_calls_total", outcome=o) for o in ("success", "failure")}
        for _ in range(3):
            await breaker.call(ok)
        await failing(breaker, 2)
        with pytest.raises(BreakerOpenError):
            await breaker.call(ok)
        assert sample("breaker_state") == 2
        clock.advance(5)
        await breaker.call(ok)  # the single trial closes it
        assert sample("breaker_state") == 0
        assert sample("breaker_calls_total", outcome="success") - before["success"] == 4
        assert sample("breaker_calls_total", outcome="failure") - before["failure"] == 2
        assert sample("breaker_calls_total", outcome="rejected") >= 1
        assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
        opened = sample("breaker_transitions_total", from_state="closed", to="open")
        assert opened >= 1


@pytest.mark.chaos
async def test_an_opening_during_a_redis_outage_spreads_when_redis_returns(
    tmp_path: Path,
) -> None:
    server = start_redis(tmp_path / "redis")
    gateways = [
        RedisGateway(server.url, connect_timeout=0.2, socket_timeout=0.2, backoff_step=0.05)
        for _ in range(2)
    ]
    registries = [
        BreakerRegistry(default=BreakerConfig(minimum_calls=2, window_size=2, open_duration=60))
        for _ in range(2)
    ]
    fleets = [BreakerFleet(r, g) for r, g in zip(registries, gateways, strict=True)]
    ours, theirs = (registry.get("upstream") for registry in registries)
    for fleet in fleets:
        await fleet.start()
    try:
        server.stop()
        await failing(ours, 2)  # trips while Redis is down: local only, nothing waits
        assert state_of(ours) is BreakerState.OPEN
        assert state_of(theirs) is BreakerState.CLOSED
        server.start()  # same folder, same port
        await wait_for_state(theirs, BreakerState.OPEN, timeout=15)
        assert 0 < theirs.remaining_open() <= 60
    finally:
        for fleet in fleets:
            await fleet.close()
        for gateway in gateways:
            await gateway.close()
        server.stop()
