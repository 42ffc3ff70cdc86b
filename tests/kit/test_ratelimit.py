"""kit.ratelimit against the real Redis: exactness, sliding capacity, atomic multi-limit
decisions, shadow mode, admin state/reset, and one budget shared by two OS processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_async
from prometheus_client import REGISTRY

from surge.kit.ratelimit import (
    Check,
    Per,
    RateLimiter,
    RatePolicy,
    parse_policies,
    with_constant_routes,
)
from surge.kit.redis import RedisGateway
from surge.kit.telemetry import metrics
from tests.fixtures.clock import Clock
from tests.fixtures.servers import ROOT, start_redis


def policy(name: str, limit: int, seconds: float, **extra: object) -> RatePolicy:
    return RatePolicy.model_validate(
        {"name": name, "limit": limit, "period": timedelta(seconds=seconds), **extra}
    )


MakeLimiter = Callable[..., RateLimiter]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module's own Redis (no database needed; independent of the session servers)."""
    server = start_redis(tmp_path_factory.mktemp("ratelimit-redis"))
    yield server.url
    server.stop()


@pytest.fixture
async def make_limiter(redis_url: str) -> AsyncIterator[MakeLimiter]:
    gateways: list[RedisGateway] = []

    def make(*policies: RatePolicy, **kwargs: object) -> RateLimiter:
        gateway = RedisGateway(redis_url)
        gateways.append(gateway)
        kwargs.setdefault("prefix", f"rl-test-{uuid.uuid4().hex[:8]}:")
        return RateLimiter(gateway, list(policies), **kwargs)  # type: ignore[arg-type]

    yield make
    for gateway in gateways:
        await gateway.close()


class TestExactness:
    async def test_exactly_n_allowed_then_n_plus_one_denied(
        self, make_limiter: MakeLimiter
    ) -> None:
        limiter = make_limiter(policy("anon", 50, 900))
        results = [await limiter.hit("anon", "ip:10.0.0.1") for _ in range(51)]
        assert [d.allowed for d in results] == [True] * 50 + [False]
        assert [d.verdicts[0].remaining for d in results[:3]] == [49, 48, 47]
        assert results[49].verdicts[0].remaining == 0
        # capacity returns one unit every 900 / 50 = 18 s
        assert 17.0 < results[50].retry_after <= 18.0
        assert results[50].denied_by == ["anon"]
        # another partition has its own budget
        assert (await limiter.hit("anon", "ip:10.0.0.2")).allowed

    async def test_any_partition_text_is_its_own_key(self, make_limiter: MakeLimiter) -> None:
        """Keys travel to Redis one per line: a partition with a line break, spaces or
        non-ASCII text (caller-supplied ids) must neither break a batch nor share a budget."""
        limiter = make_limiter(policy("odd", 2, 60))
        partitions = ["a\nb", "a", "b", "a b|c:d", "ünï\r\n", "a\\nb", "bad\udcff", "bad\ufffd"]
        decisions = await asyncio.gather(
            *(limiter.hit("odd", p) for p in partitions for _ in range(3))
        )
        for i, partition in enumerate(partitions):
            mine = decisions[3 * i : 3 * i + 3]
            assert sorted(d.allowed for d in mine) == [False, True, True], partition

    def test_negative_costs_and_uncountable_policies_are_refused(self) -> None:
        from surge.kit.ratelimit import RateLimitError, RouteLimit

        with pytest.raises(RateLimitError):
            Check(policy("p", 10, 60), "u", -1)  # it would refund budget
        with pytest.raises(ValueError, match="negative"):
            RouteLimit("p", cost=-1)
        with pytest.raises(ValueError, match="negative"):
            RouteLimit("p", weight=-5)
        # 10**9 a minute needs an interval under 1 µs: it would allow 6 * 10**7, not 10**9
        with pytest.raises(ValueError, match="exactly"):
            policy("fine", 10**9, 60)
        with pytest.raises(ValueError, match="exactly"):
            policy("uneven", 999_999_999, 3600)  # interval 3 µs: 1.2 * 10**9 would pass
        assert policy("coarse", 10**8, 3600).interval_us == 36

    async def test_weighted_cost(self, make_limiter: MakeLimiter) -> None:
        limiter = make_limiter(policy("heavy", 10, 60))
        assert [(await limiter.hit("heavy", "u", cost=3)).allowed for _ in range(4)] == [
            True, True, True, False,
        ]  # fmt: skip
        assert (await limiter.hit("heavy", "u", cost=1)).allowed  # 9 + 1 = 10 still fits
        assert not (await limiter.hit("heavy", "u", cost=1)).allowed


class TestSlidingCapacity:
    async def test_capacity_returns_at_the_declared_rate(self, make_limiter: MakeLimiter) -> None:
        clock = Clock()
        limiter = make_limiter(policy("p", 10, 10), clock=clock)  # one unit per second

        async def burst() -> int:
            allowed = 0
            while (await limiter.hit("p", "k")).allowed:
                allowed += 1
            return allowed

        assert await burst() == 10
        denied = await limiter.hit("p", "k")
        assert denied.retry_after == pytest.approx(1.0)
        clock.advance(0.5)
        assert not (await limiter.hit("p", "k")).allowed  # half a unit is not a unit
        clock.advance(0.5)
        assert await burst() == 1
        clock.advance(5)
        assert await burst() == 5  # no window edge: 5 s give back exactly 5
        clock.advance(3600)
        assert await burst() == 10  # never more than the full budget

    async def test_no_double_burst_at_a_window_edge(self, make_limiter: MakeLimiter) -> None:
        """A fixed window lets 2 × limit through around its edge; this must not."""
        clock = Clock()
        limiter = make_limiter(policy("p", 100, 60), clock=clock)
        clock.advance(59.9)
        first = sum([(await limiter.hit("p", "k")).allowed for _ in range(100)])
        clock.advance(0.2)  # the "next window" of a fixed-window limiter
        second = sum([(await limiter.hit("p", "k")).allowed for _ in range(100)])
        assert (first, second) == (100, 0)


class TestOneDecisionForSeveralLimits:
    async def test_denial_spends_no_other_budget(self, make_limiter: MakeLimiter) -> None:
        wide, narrow = policy("wide", 100, 60), policy("narrow", 2, 60)
        limiter = make_limiter(wide, narrow)
        checks = [Check(wide, "u1"), Check(narrow, "u1")]
        decisions = [await limiter.check(checks) for _ in range(5)]
        assert [d.allowed for d in decisions] == [True, True, False, False, False]
        assert decisions[2].denied_by == ["narrow"]
        state = await limiter.state("wide", "u1")
        assert state.remaining == 98  # the three denied requests spent nothing of "wide"

    async def test_concurrent_checks_never_overspend(self, make_limiter: MakeLimiter) -> None:
        a, b = policy("a", 30, 3600), policy("b", 1000, 3600)
        limiter = make_limiter(a, b)
        decisions = await asyncio.gather(
            *(limiter.check([Check(a, "k"), Check(b, "k")]) for _ in range(60))
        )
        assert sum(d.allowed for d in decisions) == 30
        assert (await limiter.state("b", "k")).remaining == 970

    async def test_more_in_flight_than_the_pool_is_not_an_outage(
        self, make_limiter: MakeLimiter
    ) -> None:
        """300 decisions at once on a 64-connection pool: redis-py raises MaxConnectionsError
        for the surplus; they wait for a connection, Redis is not marked down, none is
        decided locally, and the shared budget is exact."""
        limiter = make_limiter(policy("burst", 250, 3600))
        decisions = await asyncio.gather(*(limiter.hit("burst", "k") for _ in range(300)))
        assert limiter.gateway.is_up
        assert {v.store for d in decisions for v in d.verdicts} == {"redis"}
        assert sum(d.allowed for d in decisions) == 250

    async def test_shadow_policy_counts_but_never_blocks(self, make_limiter: MakeLimiter) -> None:
        shadow = policy("new-rule", 2, 60, shadow=True)
        limiter = make_limiter(shadow)

        def shadow_denials() -> float:
            labels = {"policy": "new-rule", "outcome": "shadow_denied", "store": "redis"}
            metrics.flush_all()  # decisions are counted in batches (ADR 0023)
            return REGISTRY.get_sample_value("ratelimit_decisions_total", labels) or 0.0

        before = shadow_denials()
        decisions = [await limiter.hit("new-rule", "k") for _ in range(5)]
        assert all(d.allowed for d in decisions)
        assert [d.verdicts[0].allowed for d in decisions] == [True, True, False, False, False]
        assert shadow_denials() - before == 3


class TestAdmin:
    async def test_state_and_reset_one_key(self, make_limiter: MakeLimiter) -> None:
        limiter = make_limiter(policy("p", 5, 50))
        for _ in range(5):
            await limiter.hit("p", "victim")
        state = await limiter.state("p", "victim")
        assert state.remaining == 0
        assert 49 < state.reset_after <= 50
        assert (await limiter.state("p", "other")).remaining == 5
        await limiter.reset("p", "victim")
        assert (await limiter.state("p", "victim")).remaining == 5
        assert (await limiter.hit("p", "victim")).allowed

    def test_policy_names_are_unique(self) -> None:
        with pytest.raises(ValueError, match="named 'x'"):
            parse_policies([{"name": "x", "limit": 1, "period": 1}] * 2)

    def test_except_routes_leave_paths_out_of_a_policy(self) -> None:
        policy = RatePolicy(
            name="p", limit=5, period=timedelta(minutes=1),
            routes=("/api/*",), except_routes=("/api/files/*", "/api/schema"),
        )  # fmt: skip
        assert policy.matches("GET", "/api/orders", "any", False)
        assert not policy.matches("GET", "/api/files/app.css", "any", False)
        assert not policy.matches("GET", "/api/schema", "any", False)
        assert policy.matches("GET", "/api/schema/v2", "any", False)
        assert not policy.matches("GET", "/other", "any", False)

    def test_the_constant_routes_are_merged_into_any_policy_list(self) -> None:
        """ADR 0060: an operator's own list keeps ``static-1m`` and the tier exclusions."""
        routes = ["/static/*", "/docs"]
        own: list[dict[str, Any] | RatePolicy] = [
            {"name": "guests", "limit": 5, "period": "PT15M", "tiers": ["anonymous"]},
            {"name": "gold", "limit": 9, "period": "PT15M", "tiers": ["gold"], "except_routes": []},
            RatePolicy(name="silver", limit=7, period=timedelta(minutes=15), tiers=("silver",)),
            {"name": "flood", "limit": 99, "period": "PT1M", "per": "ip"},
            {"name": "exports", "limit": 2, "period": "PT1H", "scope": "route", "tiers": ["x"]},
        ]
        merged = {p.name: p for p in parse_policies(with_constant_routes(own, routes))}
        assert merged["guests"].except_routes == tuple(routes)
        assert merged["silver"].except_routes == tuple(routes)
        assert merged["gold"].except_routes == ()  # said so explicitly: left as is
        assert merged["flood"].except_routes == ()  # every tier: a flood cap counts them
        assert merged["exports"].except_routes == ()  # a route's own limit
        static = merged["static-1m"]
        assert (static.limit, static.per, static.routes) == (300, Per.ip, tuple(routes))
        assert not merged["guests"].matches("GET", "/docs", "anonymous", False)
        assert static.matches("GET", "/static/app.css", "anonymous", False)
        # An operator's own static-1m is kept (given the routes if it names none)...
        mine = {"name": "static-1m", "limit": 30, "period": "PT1M", "per": "ip"}
        [kept] = parse_policies(with_constant_routes([mine], routes))
        assert (kept.limit, kept.routes) == (30, tuple(routes))
        # ...and no constant routes means the list exactly as configured.
        assert with_constant_routes(own, []) == own


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import timedelta
    from surge.kit.ratelimit import RateLimiter, RatePolicy
    from surge.kit.redis import RedisGateway

    async def main(url, prefix, attempts):
        gateway = RedisGateway(url)
        limiter = RateLimiter(gateway, [RatePolicy(name="shared", limit=100,
                              period=timedelta(days=1))], prefix=prefix)
        print("ready", flush=True)
        sys.stdin.readline()  # both processes start together
        allowed = 0
        for _ in range(attempts):
            allowed += (await limiter.hit("shared", "one-budget")).allowed
        await gateway.close()
        print(allowed, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


class TestSharedBudget:
    def test_two_processes_share_one_budget_exactly(self, redis_url: str) -> None:
        prefix = f"rl-procs-{uuid.uuid4().hex[:8]}:"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, redis_url, prefix, "90"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for _ in range(2)
        ]
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        outputs = [proc.communicate("go\n", timeout=60)[0] for proc in procs]
        allowed = [int(out.strip().splitlines()[-1]) for out in outputs]
        assert sum(allowed) == 100, allowed  # 180 attempts, one budget of 100
        assert all(a > 0 for a in allowed), allowed  # both really took part


async def evalsha_calls(url: str) -> int:
    """EVALSHA commands Redis has executed so far (``INFO commandstats``): round trips of
    the limiter (the GET/SETs its script runs are counted under their own names)."""
    client = redis_async.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@asynccontextmanager
async def redis_frozen(url: str, milliseconds: int) -> AsyncIterator[None]:
    """Redis answers nobody for ``milliseconds`` (``CLIENT PAUSE``): a round trip sent now
    stays in flight, so whatever the test queues meanwhile is deterministic."""
    client = redis_async.Redis.from_url(url)
    try:
        await client.client_pause(milliseconds, all=True)
        yield
    finally:
        await client.aclose()


async def in_flight(limiter: RateLimiter) -> None:
    """Until the limiter has taken every queued decision into a round trip in flight."""
    async with asyncio.timeout(5):  # a limiter that never batches fails here, not hangs
        while limiter._queue or limiter._flusher is None or limiter._flusher.done():  # noqa: ASYNC110
            await asyncio.sleep(0)  # a few loop turns: the limiter has no hook to wait on


class TestCoalescedRoundTrips:
    async def test_several_limits_of_one_decision_cost_one_round_trip(
        self, make_limiter: MakeLimiter, redis_url: str
    ) -> None:
        a, b, c = policy("a", 10, 60), policy("b", 10, 60), policy("c", 1, 60)
        limiter = make_limiter(a, b, c)
        await limiter.hit("a", "warm")  # loads the script
        before = await evalsha_calls(redis_url)
        first = await limiter.check([Check(a, "k"), Check(b, "k"), Check(c, "k")])
        second = await limiter.check([Check(a, "k"), Check(b, "k"), Check(c, "k")])
        assert await evalsha_calls(redis_url) - before == 2  # one per decision, not per limit
        assert (first.allowed, second.allowed) == (True, False)
        assert second.denied_by == ["c"]

    async def test_concurrent_decisions_share_round_trips_and_stay_exact(
        self, make_limiter: MakeLimiter, redis_url: str
    ) -> None:
        """60 concurrent 2-limit decisions against a limit of 25: far fewer than 60 round
        trips, exactly the first 25 (in arrival order) allowed, and the 35 denied spend
        nothing of the other limit."""
        narrow, wide = policy("narrow", 25, 3600), policy("wide", 1000, 3600)
        limiter = make_limiter(narrow, wide)
        await limiter.hit("wide", "warm")
        before = await evalsha_calls(redis_url)
        decisions = await asyncio.gather(
            *(limiter.check([Check(narrow, "k"), Check(wide, "k")]) for _ in range(60))
        )
        trips = await evalsha_calls(redis_url) - before
        assert [d.allowed for d in decisions] == [True] * 25 + [False] * 35
        assert 1 <= trips < 60, trips
        assert (await limiter.state("wide", "k")).remaining == 975
        assert [d.verdicts[0].remaining for d in decisions[:3]] == [24, 23, 22]

    async def test_decisions_queued_behind_a_round_trip_leave_together(
        self, make_limiter: MakeLimiter, redis_url: str
    ) -> None:
        """One decision in flight (Redis paused), ten queue behind it: two round trips for
        eleven decisions, and the budget of 5 goes to the first five to arrive."""
        limiter = make_limiter(policy("p", 5, 3600))
        await limiter.hit("p", "warm")
        before = await evalsha_calls(redis_url)
        async with redis_frozen(redis_url, 300):
            first = asyncio.create_task(limiter.hit("p", "k"))
            await in_flight(limiter)
            rest = [asyncio.create_task(limiter.hit("p", "k")) for _ in range(10)]
            decisions = [await first, *await asyncio.gather(*rest)]
        assert await evalsha_calls(redis_url) - before == 2
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 6

    async def test_a_caller_cancelled_before_its_batch_leaves_spends_nothing(
        self, make_limiter: MakeLimiter, redis_url: str
    ) -> None:
        limiter = make_limiter(policy("p", 10, 3600))
        await limiter.hit("p", "warm")
        async with redis_frozen(redis_url, 300):
            first = asyncio.create_task(limiter.hit("p", "k"))
            await in_flight(limiter)
            gone, kept = (asyncio.create_task(limiter.hit("p", "k")) for _ in range(2))
            await asyncio.sleep(0)  # both queued behind the paused round trip
            gone.cancel()
            assert (await first).allowed
            assert (await kept).allowed
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert (await limiter.state("p", "k")).remaining == 8  # the cancelled one: not spent

    async def test_redis_lost_mid_batch_falls_back_for_every_member(self, tmp_path: Path) -> None:
        """The server dies with a batch in flight: every member is decided by its policy's
        fallback (local share), none hangs, none gets an error."""
        server = start_redis(tmp_path / "redis")
        gateway = RedisGateway(server.url)
        limiter = RateLimiter(gateway, [policy("p", 100, 3600)], local_processes=2)
        try:
            await limiter.hit("p", "warm")
            async with redis_frozen(server.url, 1000):
                tasks = [asyncio.create_task(limiter.hit("p", "k")) for _ in range(8)]
                await in_flight(limiter)
                server.kill()
                decisions = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
            assert {v.store for d in decisions for v in d.verdicts} == {"local"}
            assert all(d.allowed for d in decisions)
            assert not gateway.is_up
        finally:
            await gateway.close()
            server.stop()


class TestUncoalesced:
    async def test_one_round_trip_per_decision_when_coalescing_is_off(
        self, make_limiter: MakeLimiter, redis_url: str
    ) -> None:
        limiter = make_limiter(policy("p", 20, 3600), coalesce=False)
        await limiter.hit("p", "warm")
        before = await evalsha_calls(redis_url)
        decisions = await asyncio.gather(*(limiter.hit("p", "k") for _ in range(30)))
        assert await evalsha_calls(redis_url) - before == 30
        assert sum(d.allowed for d in decisions) == 20


class TestHeadersFromTheScript:
    async def test_fast_headers_equal_the_verdicts_headers(self, make_limiter: MakeLimiter) -> None:
        """The middleware formats RateLimit fields straight from the script's reply; they
        must say exactly what the verdicts say: allowed, denied, weighted and shadow checks."""
        from surge.kit.ratelimit.limiter import Decision
        from surge.kit.ratelimit.web import rate_limit_headers

        tight, wide = policy("tight", 3, 60), policy("wide", 100, 3600)
        watch = policy("watch", 1, 60, shadow=True)
        limiter = make_limiter(tight, wide, watch)
        checks = [Check(tight, "u"), Check(wide, "u", 7), Check(watch, "u")]
        seen = 0
        for _ in range(5):
            decision = await limiter.check(checks)
            assert decision.rels is not None  # decided by the script
            from_verdicts = Decision(decision.allowed, list(decision.verdicts))
            assert from_verdicts.rels is None
            assert rate_limit_headers(decision) == rate_limit_headers(from_verdicts)
            seen += decision.allowed
        assert seen == 3
        assert rate_limit_headers(decision)[1][1].startswith(b'"tight";r=0;t=60, "wide";r=')
