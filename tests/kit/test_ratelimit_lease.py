"""Local token leases (ADR 0028) against the real Redis, with two limiter instances standing
for two web processes sharing one budget: the overshoot is at most processes × lease, a
decision stays all-or-nothing, exact mode stays selectable per policy, and most decisions
cost no round trip."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from surge.kit.ratelimit import Check, RateLimiter, RatePolicy
from surge.kit.ratelimit._lease import LEASE_GROW_MAX, LEASE_MAX, lease_cap, lease_size
from surge.kit.ratelimit.web import rate_limit_headers
from surge.kit.redis import RedisGateway
from tests.fixtures.clock import Clock
from tests.fixtures.servers import start_redis


def policy(name: str, limit: int, seconds: float, **extra: object) -> RatePolicy:
    return RatePolicy.model_validate(
        {"name": name, "limit": limit, "period": timedelta(seconds=seconds), **extra}
    )


MakeLimiter = Callable[..., RateLimiter]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start_redis(tmp_path_factory.mktemp("ratelimit-lease-redis"))
    yield server.url
    server.stop()


@pytest.fixture
async def make_pair(redis_url: str) -> AsyncIterator[Callable[..., list[RateLimiter]]]:
    """Limiters sharing one prefix (one budget in Redis), one per "process"."""
    gateways: list[RedisGateway] = []

    def make(*policies: RatePolicy, processes: int = 2, **kwargs: Any) -> list[RateLimiter]:
        prefix = f"rl-lease-{uuid.uuid4().hex[:8]}:"
        limiters = []
        for _ in range(processes):
            gateway = RedisGateway(redis_url)
            gateways.append(gateway)
            limiters.append(
                RateLimiter(
                    gateway, list(policies), prefix=prefix, local_processes=processes,
                    lease=True, **kwargs,
                )
            )  # fmt: skip
        return limiters

    yield make
    for gateway in gateways:
        await gateway.close()


def count_round_trips(limiter: RateLimiter) -> list[int]:
    calls = [0]
    send = limiter._evalsha

    async def counted(*args: Any) -> Any:
        calls[0] += 1
        return await send(*args)

    limiter._evalsha = counted  # type: ignore[method-assign]
    return calls


async def drain(limiters: list[RateLimiter], name: str, partition: str) -> int:
    """Hit every limiter in turn until each is refused: how many were allowed in all."""
    allowed = 0
    open_ = list(limiters)
    while open_:
        for limiter in list(open_):
            if (await limiter.hit(name, partition)).allowed:
                allowed += 1
            else:
                open_.remove(limiter)
    return allowed


class TestLeaseSize:
    def test_sized_from_the_limit_exact_when_small_shadow_or_asked(self) -> None:
        assert lease_size(policy("free", 300, 900), 2) == 7  # 300 // (2 × 20)
        assert lease_size(policy("big", 10**8, 3600), 2) == LEASE_MAX
        assert lease_size(policy("small", 50, 900), 2) == 0  # 1 unit: not worth a lease
        assert lease_size(policy("shadow", 10**6, 60, shadow=True), 2) == 0
        assert lease_size(policy("exact", 10**6, 60, lease=0), 2) == 0
        assert lease_size(policy("asked", 100, 60, lease=3), 2) == 3

    def test_a_busy_key_may_grow_to_the_limits_share_at_most(self) -> None:
        """ADR 0039: the cap of a growing lease is the limit's 5 % share per process, at most
        LEASE_GROW_MAX; seed 003/004's policies are small enough that nothing grows."""
        assert lease_cap(policy("free", 300, 900), 2) == 7  # = its first lease
        assert lease_cap(policy("user", 1000, 60), 2) == 25
        assert lease_cap(policy("ip", 10_000, 60), 2) == 250  # 10 000 // (2 × 20)
        assert lease_cap(policy("mid", 4000, 60), 2) == 100
        assert lease_cap(policy("big", 10**8, 3600), 2) == LEASE_GROW_MAX
        assert lease_cap(policy("asked", 10**8, 3600, lease=3), 2) == 3  # fixed: no growth
        assert lease_cap(policy("exact", 10**6, 60, lease=0), 2) == 0
        assert lease_cap(policy("small", 50, 900), 2) == 0


class TestBound:
    async def test_a_burst_never_passes_the_limit(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        """At one instant every unit spent was granted by Redis' exact GCRA: at most the
        limit passes, and at most one lease per process is left stranded."""
        clock = Clock()
        limiters = make_pair(policy("p", 400, 60), clock=clock)
        size = limiters[0].lease_sizes["p"]
        assert size == 10
        allowed = await drain(limiters, "p", "user-1")
        assert 400 - 2 * size <= allowed <= 400

    async def test_overshoot_is_at_most_processes_times_the_lease(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        """The worst case: both processes lease, the bucket refills, then every process
        spends its old lease on top of a full bucket. Exact GCRA allows the limit at that
        instant; leasing allows at most processes × lease more, and exactly that here."""
        clock = Clock()
        limiters = make_pair(policy("p", 400, 60), clock=clock)
        size = limiters[0].lease_sizes["p"]
        for limiter in limiters:
            assert (await limiter.hit("p", "user-1")).allowed
            assert limiter.leases.units("p:user-1") == size
        clock.advance(60 - 1e-6)  # the bucket is full again; the leases are still valid
        allowed = await drain(limiters, "p", "user-1")
        assert allowed == 400 + 2 * size

    async def test_grown_leases_overshoot_at_most_processes_times_the_cap(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        """The worst case again, with leases that grew (ADR 0039): each process spends its
        first lease whole, so its next one is larger (64 → 100, the cap of 4 000 a minute
        for 2 processes); then the bucket refills and both spend their grown leases on top
        of a full bucket: exactly processes × cap more than the limit, never more."""
        clock = Clock()
        limiters = make_pair(policy("p", 4000, 60), clock=clock)
        start, cap = limiters[0].lease_sizes["p"], limiters[0].lease_caps["p"]
        assert (start, cap) == (LEASE_MAX, 100)
        for limiter in limiters:
            calls = count_round_trips(limiter)
            sizes = []
            for _ in range(2 + start):  # one with the first lease, `start` from it, one more
                assert (await limiter.hit("p", "user-1")).allowed
                sizes.append(limiter.leases.size("p:user-1"))
            assert calls[0] == 2
            assert sizes[0] == start
            assert sizes[-1] == cap
            assert limiter.leases.units("p:user-1") == cap
        clock.advance(60 - 1e-6)  # the bucket is full again; the grown leases are still valid
        allowed = await drain(limiters, "p", "user-1")
        assert allowed == 4000 + 2 * cap
        assert all(limiter.leases.size("p:user-1") <= cap for limiter in limiters)

    async def test_requests_that_went_to_redis_together_hold_one_cap_at_most(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        """Twenty first requests of a key at once all go to Redis and each brings a grant:
        the process keeps at most ``cap`` units of them, so the bound holds; the limit is
        still never passed by more than processes × cap overall."""
        import asyncio

        clock = Clock()
        limiters = make_pair(policy("p", 10_000, 60), clock=clock)
        cap = limiters[0].lease_caps["p"]
        for limiter in limiters:
            decided = await asyncio.gather(*(limiter.hit("p", "user-1") for _ in range(20)))
            assert all(d.allowed for d in decided)
            assert limiter.leases.units("p:user-1") <= cap
        assert await drain(limiters, "p", "user-1") + 40 <= 10_000 + 2 * cap

    async def test_a_key_that_leaves_its_lease_unspent_starts_small_again(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        clock = Clock()
        (limiter,) = make_pair(policy("p", 10**6, 60), processes=1, clock=clock)
        for _ in range(2 + LEASE_MAX):
            assert (await limiter.hit("p", "user-1")).allowed
        assert limiter.leases.size("p:user-1") == 2 * LEASE_MAX  # it spent a whole lease
        clock.advance(60 + 1e-3)  # its lease died unspent: not busy after all
        assert (await limiter.hit("p", "user-1")).allowed
        assert limiter.leases.size("p:user-1") == LEASE_MAX

    async def test_a_lease_dies_with_its_window(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        clock = Clock()
        limiters = make_pair(policy("p", 400, 60), clock=clock)
        for limiter in limiters:
            assert (await limiter.hit("p", "user-1")).allowed
        clock.advance(60 + 1e-3)
        assert await drain(limiters, "p", "user-1") == 400

    async def test_exact_policy_and_exact_limiter_never_overshoot(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        clock = Clock()
        limiters = make_pair(policy("p", 400, 60, lease=0), clock=clock)
        for limiter in limiters:
            assert (await limiter.hit("p", "user-1")).allowed
            assert not limiter.leases
        clock.advance(60 - 1e-6)
        assert await drain(limiters, "p", "user-1") == 400


class TestRoundTrips:
    async def test_most_decisions_are_spent_from_the_lease(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        (limiter,) = make_pair(policy("p", 10**6, 60), processes=1)
        calls = count_round_trips(limiter)
        for _ in range(200):
            assert (await limiter.hit("p", "user-1")).allowed
        # one per lease (+ its own unit); each lease twice the last (ADR 0039):
        # 1 + 64, 1 + 128, then 1 + 256 of which 6 are spent
        assert calls[0] == 3
        for _ in range(4800):
            assert (await limiter.hit("p", "user-1")).allowed
        # 5 000 in all: 65 + 129 + 257 + 513 = 964, then 1 025 a lease (the cap): 4 more
        assert calls[0] == 8
        assert limiter.leases.size("p:user-1") == LEASE_GROW_MAX


class TestOneDecision:
    async def test_a_denial_elsewhere_gives_the_leased_units_back(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        clock = Clock()
        leased, exact = policy("user", 1000, 60), policy("endpoint", 2, 60, lease=0)
        (limiter,) = make_pair(leased, exact, processes=1, clock=clock)
        both = [Check(leased, "u"), Check(exact, "u")]
        assert (await limiter.check(both)).allowed  # leases "user", spends "endpoint"
        before = limiter.leases.units("user:u")
        assert before > 0
        assert (await limiter.check(both)).allowed  # "user" from the lease
        assert limiter.leases.units("user:u") == before - 1
        denied = await limiter.check(both)
        assert not denied.allowed
        assert denied.denied_by == ["endpoint"]
        assert limiter.leases.units("user:u") == before - 1  # given back: nothing spent
        state = await limiter.state("user", "u")  # Redis: one unit + the lease, no more
        assert state.remaining == 1000 - 1 - limiter.lease_sizes["user"]

    async def test_headers_and_retry_after_as_the_exact_limiter(
        self, make_pair: Callable[..., list[RateLimiter]]
    ) -> None:
        """One process: leased decisions report the same remaining budget as exact ones,
        and the refusal (decided in Redis) the same Retry-After."""
        clock = Clock()
        (limiter,) = make_pair(policy("p", 100, 100), processes=1, clock=clock)  # 1 unit/s
        assert limiter.lease_sizes["p"] == 5
        decisions = [await limiter.hit("p", "k") for _ in range(101)]
        assert [d.allowed for d in decisions] == [True] * 100 + [False]
        remaining = [
            int(dict(rate_limit_headers(d))[b"ratelimit"].split(b"r=")[1].split(b";")[0])
            for d in decisions[:100]
        ]
        assert remaining == list(range(99, -1, -1))
        assert {d.store for d in decisions[:100]} == {"redis", "lease"}
        assert decisions[100].retry_after == pytest.approx(1.0)
        assert dict(rate_limit_headers(decisions[100]))[b"ratelimit"] == b'"p";r=0;t=100'
