"""kit.cache in one process, against the suite's real Redis (and, for outages, a Redis the test
starts and stops itself). Two ``Cache`` objects with their own gateways stand for two
processes where only L1 separation matters; real processes are in test_cache_multiprocess.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_async
from prometheus_client import REGISTRY
from sqlalchemy import text

from surge.kit.cache import Cache, RecursiveLoad, ValueNotCacheable
from surge.kit.embedded import EmbeddedRedis
from surge.kit.redis import RedisGateway
from surge.kit.runtime import Runtime
from tests.fixtures.servers import start_redis
from tests.fixtures.waiting import eventually


class Clock:
    """Injectable wall clock: tests move time instead of sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Counter:
    """A loader that counts its calls and can be told to fail or to wait."""

    def __init__(self, value: Any = "v", delay: float = 0.0) -> None:
        self.calls = 0
        self.value = value
        self.delay = delay
        self.fail: Exception | None = None

    async def __call__(self) -> Any:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return self.value


CacheFactory = Callable[..., Awaitable[Cache]]


@pytest.fixture
async def make_cache(server_urls: tuple[str, str]) -> AsyncIterator[CacheFactory]:
    """Caches sharing one fresh namespace on the suite's Redis, closed after the test."""
    namespace = f"test:{uuid.uuid4().hex[:8]}"
    made: list[tuple[Cache, RedisGateway]] = []

    async def factory(url: str | None = None, max_connections: int = 64, **options: Any) -> Cache:
        gateway = RedisGateway(
            url or server_urls[1],
            backoff_step=0.05,
            backoff_max=0.2,
            max_connections=max_connections,
        )
        options.setdefault("namespace", namespace)
        options.setdefault("ttl_jitter", 0.0)
        cache = Cache(gateway, **options)
        await cache.start()
        made.append((cache, gateway))
        return cache

    yield factory
    for cache, gateway in made:
        await cache.close()
        await gateway.close()


async def _all_called(loaders: Iterable[Counter], times: int) -> bool:
    return all(loader.calls == times for loader in loaders)


class TestTiers:
    async def test_miss_loads_then_l1_then_l2_in_another_process(
        self, make_cache: CacheFactory
    ) -> None:
        a, b = await make_cache(), await make_cache()
        loader = Counter({"n": 1, "t": (1, 2)})
        first = await a.fetch("k", loader)
        assert (first.source, first.stale) == ("loader", False)
        # Every process sees the msgpack round trip, the writer included: tuples are lists.
        assert first.value == {"n": 1, "t": [1, 2]}
        assert (await a.fetch("k", loader)).source == "l1"
        assert (await b.fetch("k", loader)).source == "l2"
        assert (await b.fetch("k", loader)).source == "l1"
        assert loader.calls == 1

    async def test_ttl_is_honoured_with_an_injected_clock(self, make_cache: CacheFactory) -> None:
        clock = Clock()
        options = {"clock": clock, "stale_while_revalidate": 0.0, "max_stale": 0.0}
        a, b = await make_cache(**options), await make_cache(**options)
        loader = Counter("v1")
        await a.set("k", "v0", ttl=10)
        clock.advance(9.9)
        assert await a.get("k") == "v0"
        assert await b.get("k") == "v0"  # from L2: the envelope carries the expiry
        clock.advance(0.2)
        assert await a.get("k", "MISS") == "MISS"
        assert await b.get("k", "MISS") == "MISS"
        assert await a.get_or_load("k", loader, ttl=10) == "v1"
        assert loader.calls == 1

    async def test_ttl_jitter_spreads_expiries_and_never_extends_them(
        self, make_cache: CacheFactory
    ) -> None:
        clock = Clock()
        cache = await make_cache(clock=clock, ttl_jitter=0.2)
        for i in range(50):
            await cache.set(f"j{i}", i, ttl=100)
        expiries = [cache.l1.stored(f"j{i}").fresh_until - clock.now for i in range(50)]  # type: ignore[union-attr]
        assert all(80 <= e <= 100 for e in expiries), expiries
        assert len({round(e, 3) for e in expiries}) > 40  # not expiring together

    async def test_hot_entries_refresh_early_in_the_background_never_expiring(
        self, make_cache: CacheFactory
    ) -> None:
        # Issue 19: entries written together expired together and turned stale as a wave.
        clock = Clock()
        cache = await make_cache(
            clock=clock, early_refresh=0.2, stale_while_revalidate=30.0, l1_ttl=1000.0
        )
        loaders = {f"e{i}": Counter(f"v{i}") for i in range(40)}
        for key, loader in loaders.items():
            await cache.fetch(key, loader, ttl=100)
        clock.advance(79)  # before the window (the last 20 s): plain hits, no refresh
        for key, loader in loaders.items():
            assert (await cache.fetch(key, loader, ttl=100)).source == "l1"
        assert all(loader.calls == 1 for loader in loaders.values())
        # Through the window, a read every second: each entry is renewed once, at a moment
        # of its own, and no read ever sees it stale or waits for its load.
        moments: dict[str, float] = {}
        for second in range(1, 21):
            clock.advance(1)
            for key, loader in loaders.items():
                result = await cache.fetch(key, loader, ttl=100)
                assert (result.source, result.stale) == ("l1", False)
            await asyncio.sleep(0.01)  # the background loads run
            for key, loader in loaders.items():
                if loader.calls == 2 and key not in moments:
                    moments[key] = second
        await eventually(lambda: _all_called(loaders.values(), 2))
        assert len(set(moments.values())) > 5  # spread over the window, not one wave
        clock.advance(15)  # past the first expiry: the renewed entries are still fresh
        for key, loader in loaders.items():
            assert (await cache.fetch(key, loader, ttl=100)).stale is False

    async def test_early_refresh_off_and_l1_trust_jittered(self, make_cache: CacheFactory) -> None:
        clock = Clock()
        off = await make_cache(clock=clock, early_refresh=0.0, l1_ttl=60.0, ttl=300.0)
        loader = Counter("v")
        await off.fetch("k", loader)
        clock.advance(299)
        assert (await off.get_or_load("k", loader)) == "v"
        await asyncio.sleep(0.01)
        assert loader.calls == 1
        jittered = await make_cache(clock=clock, ttl_jitter=0.5, l1_ttl=60.0, ttl=3000.0)
        for i in range(30):
            await jittered.set(f"t{i}", i)
        trusts = {round(jittered.l1.stored(f"t{i}").trust_until - clock.now, 3) for i in range(30)}  # type: ignore[union-attr]
        assert all(30 <= t <= 60 for t in trusts)
        assert len(trusts) > 20  # a warm start does not go back to Redis in one second

    async def test_l1_is_bounded_by_entry_count(self, make_cache: CacheFactory) -> None:
        cache = await make_cache(l1_max_entries=100)
        for i in range(250):
            await cache.set(f"k{i}", i)
        assert len(cache.l1) == 100
        assert cache.stats()["evictions"] == 150
        assert "k249" in cache.l1
        assert "k0" not in cache.l1
        assert await cache.get("k0") == 0  # evicted from L1, still in L2

    async def test_oversized_values_stay_out_of_redis(
        self, make_cache: CacheFactory, redis_client: redis_async.Redis
    ) -> None:
        cache = await make_cache(max_value_bytes=1000)
        await cache.set("big", "x" * 2000)
        await cache.set("small", "x" * 10)
        assert await redis_client.exists(f"{cache.namespace}:0:small") == 1
        assert await redis_client.exists(f"{cache.namespace}:0:big") == 0
        assert await cache.get("big") == "x" * 2000  # this process keeps it in L1


class TestSingleFlight:
    async def test_1000_concurrent_misses_call_the_loader_once(
        self, make_cache: CacheFactory
    ) -> None:
        cache = await make_cache()
        loader = Counter("v", delay=0.05)
        values = await asyncio.gather(*[cache.get_or_load("hot", loader) for _ in range(1000)])
        assert loader.calls == 1
        assert set(values) == {"v"}

    async def test_a_burst_of_distinct_misses_queues_instead_of_exhausting_the_pool(
        self, make_cache: CacheFactory
    ) -> None:
        """redis-py raises MaxConnectionsError past the pool size and the gateway takes that
        for "Redis down"; the cache must keep its commands under the pool size."""
        cache = await make_cache(max_connections=8)
        loader = Counter("v", delay=0.01)
        values = await asyncio.gather(*[cache.get_or_load(f"k{i}", loader) for i in range(500)])
        assert set(values) == {"v"}
        assert loader.calls == 500
        assert cache.gateway.is_up
        assert cache.stats()["degraded"] is False

    async def test_a_cancelled_caller_does_not_cancel_the_others(
        self, make_cache: CacheFactory
    ) -> None:
        cache = await make_cache()
        loader = Counter("v", delay=0.1)
        impatient = asyncio.create_task(cache.get_or_load("k", loader))
        patient = asyncio.create_task(cache.get_or_load("k", loader))
        await asyncio.sleep(0.02)
        impatient.cancel()
        assert await patient == "v"
        assert loader.calls == 1

    async def test_a_loader_asking_for_its_own_key_raises_instead_of_hanging(
        self, make_cache: CacheFactory
    ) -> None:
        cache = await make_cache()

        async def recursive() -> Any:
            return await cache.get_or_load("loop", recursive)

        with pytest.raises(RecursiveLoad):
            await asyncio.wait_for(cache.get_or_load("loop", recursive), timeout=2)

    async def test_loader_errors_propagate_when_nothing_stale_exists(
        self, make_cache: CacheFactory
    ) -> None:
        cache = await make_cache()
        loader = Counter()
        loader.fail = LookupError("db says no")
        with pytest.raises(LookupError, match="db says no"):
            await cache.get_or_load("k", loader)
        loader.fail = None
        assert await cache.get_or_load("k", loader) == "v"  # failures are not cached


class TestStale:
    async def test_stale_while_revalidate_serves_stale_and_refreshes_once(
        self, make_cache: CacheFactory
    ) -> None:
        clock = Clock()
        cache = await make_cache(clock=clock, stale_while_revalidate=30.0)
        await cache.set("k", "old", ttl=10)
        clock.advance(15)
        loader = Counter("new", delay=0.05)
        results = await asyncio.gather(*[cache.fetch("k", loader) for _ in range(50)])
        assert {(r.value, r.stale) for r in results} == {("old", True)}
        await eventually(lambda: _fresh_is(cache, "k", "new"), timeout=2.0, interval=0.01)
        assert loader.calls == 1

    async def test_stale_if_error_serves_the_stale_value_when_the_loader_raises(
        self, make_cache: CacheFactory
    ) -> None:
        clock = Clock()
        cache = await make_cache(
            clock=clock, stale_while_revalidate=0.0, max_stale=3600.0, fail_safe_throttle=5.0
        )
        await cache.set("k", "old", ttl=10)
        clock.advance(60)
        loader = Counter()
        loader.fail = ConnectionRefusedError("database down")
        result = await cache.fetch("k", loader)
        assert (result.value, result.stale) == ("old", True)
        assert loader.calls == 1
        # Throttled: the failing loader rests instead of being hammered by every request.
        assert (await cache.fetch("k", loader)).value == "old"
        assert loader.calls == 1
        clock.advance(6)
        loader.fail = None
        loader.value = "new"
        assert await cache.fetch("k", loader) == _fresh("new", "loader")

    async def test_nothing_is_served_past_max_stale(self, make_cache: CacheFactory) -> None:
        clock = Clock()
        cache = await make_cache(clock=clock, stale_while_revalidate=0.0, max_stale=100.0)
        await cache.set("k", "old", ttl=10)
        clock.advance(111)
        loader = Counter()
        loader.fail = ConnectionRefusedError("database down")
        with pytest.raises(ConnectionRefusedError):
            await cache.fetch("k", loader)


class TestInvalidation:
    async def test_delete_drops_l1_here_and_there_and_l2(self, make_cache: CacheFactory) -> None:
        a, b = await make_cache(), await make_cache()
        await a.set("k", 1)
        assert await b.get("k") == 1
        await a.delete("k")
        assert "k" not in a.l1
        await eventually(lambda: _absent(b, "k"), timeout=2.0, interval=0.01)
        assert await b.get("k", "MISS") == "MISS"

    async def test_tags_invalidate_every_entry_carrying_them(
        self, make_cache: CacheFactory
    ) -> None:
        a, b = await make_cache(), await make_cache()
        await a.set("u1", "x", tags=["team:1"])
        await a.set("u2", "y", tags=["team:1", "org:9"])
        await a.set("u3", "z", tags=["team:2"])
        for key in ("u1", "u2", "u3"):
            assert await b.get(key) is not None
        await b.invalidate_tags("team:1")
        for cache in (a, b):
            await eventually(lambda c=cache: _gone(c, "u1"))  # type: ignore[misc]
            assert await cache.get("u2", "MISS") == "MISS"
            assert await cache.get("u3") == "z"

    async def test_a_lost_message_causes_bounded_staleness(
        self, make_cache: CacheFactory, redis_client: redis_async.Redis
    ) -> None:
        """Bump a tag and the sequence number the way ``invalidate_tags`` does, but publish
        nothing: the other process must notice the gap at its next resync and stop serving."""
        b = await make_cache(resync_interval=0.1)
        await b.set("k", "old", tags=["t"])
        assert (await b.fetch("k", Counter())).source == "l1"
        await redis_client.incr(f"{b.namespace}:t:t")
        await redis_client.incr(f"{b.namespace}:seq")
        started = time.monotonic()
        await eventually(lambda: _fresh_is(b, "k", "new", loader_value="new"), timeout=2.0)
        assert time.monotonic() - started < 1.0  # ~2 resync intervals, not the 5 min TTL

    async def test_a_load_racing_a_delete_does_not_write_back_the_old_value(
        self, make_cache: CacheFactory
    ) -> None:
        """Facebook's lease rule: the delete kills the lease, the slow loader's write is refused."""
        a, b = await make_cache(), await make_cache()
        slow = Counter("read-before-the-write", delay=0.2)
        loading = asyncio.create_task(a.get_or_load("k", slow))
        await asyncio.sleep(0.05)
        await b.delete("k")  # the write committed; the loader read the old row
        assert await loading == "read-before-the-write"  # its caller still gets an answer
        assert await b.get("k", "MISS") == "MISS"
        assert await a.get("k", "MISS") == "MISS"

    async def test_clear_forgets_everything_in_o1(
        self, make_cache: CacheFactory, redis_client: redis_async.Redis
    ) -> None:
        a, b = await make_cache(), await make_cache()
        for i in range(20):
            await a.set(f"k{i}", i)
        assert await b.get("k3") == 3
        await a.clear()
        await eventually(lambda: _absent(b, "k3"), timeout=2.0, interval=0.01)
        for cache in (a, b):
            assert await cache.get("k3", "MISS") == "MISS"
        assert int(await redis_client.get(f"{a.namespace}:ver") or 0) == 1

    async def test_invalidation_waits_for_the_commit(
        self, make_cache: CacheFactory, runtime: Runtime
    ) -> None:
        cache = await make_cache()
        await cache.set("row", "old")
        async with runtime.db.session() as session:
            await session.execute(text("SELECT 1"))
            cache.invalidate_on_commit(session, keys=["row"])
            assert await cache.get("row") == "old"  # not yet: the write is uncommitted
        assert await cache.get("row", "MISS") == "MISS"

        await cache.set("row", "old")

        async def rolled_back() -> None:
            async with runtime.db.session() as session:
                cache.invalidate_on_commit(session, keys=["row"])
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            await rolled_back()
        assert await cache.get("row") == "old"


class TestBadInput:
    async def test_an_error_reply_from_redis_is_a_miss_not_an_error(
        self, make_cache: CacheFactory, redis_client: redis_async.Redis
    ) -> None:
        cache = await make_cache()
        await redis_client.hset(f"{cache.namespace}:0:k", "field", "x")  # WRONGTYPE for GET
        loader = Counter("from-db")
        assert await cache.get_or_load("k", loader) == "from-db"
        assert await cache.get("k") == "from-db"  # served from L1
        assert cache.stats()["degraded"] is False  # Redis is up: not an outage

    async def test_a_value_msgpack_cannot_encode_raises_and_frees_the_lease(
        self, make_cache: CacheFactory
    ) -> None:
        a, b = await make_cache(lease=5.0), await make_cache(lease=5.0)
        bad = Counter(object())
        with pytest.raises(ValueNotCacheable):
            await a.get_or_load("k", bad)
        # b does not wait 5 s for a lease nobody will fulfil.
        started = time.monotonic()
        assert await b.get_or_load("k", Counter("ok")) == "ok"
        assert time.monotonic() - started < 1.0


class TestRedisDown:
    @pytest.fixture
    async def own_redis(self, tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
        server = await asyncio.to_thread(start_redis, tmp_path / "redis")
        try:
            yield server
        finally:
            await asyncio.to_thread(server.stop)

    async def test_redis_stopped_mid_test_costs_callers_nothing(
        self, make_cache: CacheFactory, own_redis: EmbeddedRedis
    ) -> None:
        cache = await make_cache(own_redis.url)
        other = await make_cache(own_redis.url)
        for i in range(10):
            await cache.set(f"k{i}", i)
        await asyncio.to_thread(own_redis.stop)

        loader = Counter("from-db")
        started = time.monotonic()
        for i in range(10):
            assert await cache.get_or_load(f"k{i}", loader) == i  # L1 keeps serving
        assert await cache.get_or_load("new", loader) == "from-db"  # loader keeps serving
        assert await cache.get_or_load("new", loader) == "from-db"  # and L1 keeps it
        await cache.set("k1", "changed")
        await cache.delete("k2")
        await cache.invalidate_tags("any")
        assert time.monotonic() - started < 2.0  # no per-call socket timeouts
        assert loader.calls == 1
        assert cache.stats()["degraded"] is True
        # The other process never had k5 in its L1 and cannot reach L2: a miss, not an error.
        assert await other.get("k5", "MISS") == "MISS"

        await asyncio.to_thread(own_redis.start)  # same port
        await eventually(lambda: _recovered(cache), timeout=10)
        await other.delete("nothing")  # let other notice the outage if it has not yet
        await eventually(lambda: _recovered(other), timeout=10)
        # The delete made while Redis was down was replayed: L2 forgot k2 too.
        await eventually(lambda: _l2_lacks(other, "k2"), timeout=5)
        await cache.set("after", 1)
        assert await other.get("after") == 1

    async def test_a_redis_restart_that_lost_its_data_leaves_no_stale_l1(
        self, make_cache: CacheFactory, own_redis: EmbeddedRedis
    ) -> None:
        """No persistence: the restart loses values, tag versions and the sequence counter.
        L1 copies may have missed invalidations meanwhile, so the listener flushes them."""
        a, b = await make_cache(own_redis.url), await make_cache(own_redis.url)
        await a.set("k", "v1", tags=["t"])
        assert await b.get("k") == "v1"
        await asyncio.to_thread(own_redis.stop)
        await b.delete("zzz")  # b notices the outage
        await asyncio.to_thread(own_redis.start)
        await eventually(lambda: _recovered(b), timeout=10)
        await eventually(lambda: _absent(b, "k"), timeout=5)
        assert await b.get("k", "MISS") == "MISS"
        await a.set("k", "v2", tags=["t"])
        await a.invalidate_tags("t")
        await eventually(lambda: _gone(b, "k"), timeout=5)


class TestWarmStatsMetrics:
    async def test_warm_batch_loads_only_what_is_missing(self, make_cache: CacheFactory) -> None:
        a, b = await make_cache(), await make_cache()
        await a.set("w1", "cached")
        # Let b hear a's message first: a read racing it would (rightly) not fill L1.
        await eventually(lambda: _heard_everything(b), timeout=2.0, interval=0.01)
        asked: list[list[str]] = []

        async def batch(keys: Any) -> dict[str, Any]:
            asked.append(list(keys))
            return {k: k.upper() for k in keys if k != "w4"}

        loaded = await b.warm(["w1", "w2", "w3", "w4"], batch)
        assert loaded == 2
        assert asked == [["w2", "w3", "w4"]]
        assert [k in b.l1 for k in ("w1", "w2", "w3", "w4")] == [True, True, True, False]
        assert await a.get("w2") == "W2"

    async def test_metrics_count_hits_misses_loads_and_size(self, make_cache: CacheFactory) -> None:
        name = f"m{uuid.uuid4().hex[:6]}"
        cache = await make_cache(name=name)
        loader = Counter()
        await cache.get_or_load("k", loader)
        for _ in range(9):
            await cache.get_or_load("k", loader)
        cache._flush_metrics()

        def sample(metric: str, **labels: str) -> float:
            value = REGISTRY.get_sample_value(metric, {"cache": name, **labels})
            return float(value or 0.0)

        assert sample("cache_hits_total", tier="l1") == 9
        assert sample("cache_misses_total", tier="l1") == 1
        assert sample("cache_misses_total", tier="l2") == 1
        assert sample("cache_loads_total", outcome="ok") == 1
        assert sample("cache_load_seconds_count") == 1
        assert sample("cache_l1_entries") == 1
        assert sample("cache_hit_ratio") == pytest.approx(0.9)
        assert cache.stats()["hit_ratio"] == pytest.approx(0.9)

    async def test_runtime_builds_and_starts_the_cache(self, runtime: Runtime) -> None:
        loader = Counter("rt")
        key = f"rt-{uuid.uuid4().hex}"
        assert await runtime.cache.get_or_load(key, loader) == "rt"
        assert runtime.cache.l1.max_entries == runtime.settings.CACHE_L1_MAX_ENTRIES
        await runtime.cache.delete(key)


# ---- helpers ------------------------------------------------------------------------------
class TestFetchMany:
    async def test_each_key_answered_and_counted_by_its_tier(
        self, make_cache: CacheFactory
    ) -> None:
        a, b = await make_cache(), await make_cache()
        await a.set("in-redis", "R")
        await eventually(lambda: _heard_everything(b), timeout=2.0, interval=0.01)
        await b.set("in-memory", "M")
        # until b has read back its own invalidation, memory defers to Redis (ADR 0028)
        await eventually(lambda: _heard_everything(b), timeout=2.0, interval=0.01)
        asked: list[list[str]] = []

        async def batch(keys: Any) -> dict[str, Any]:
            asked.append(list(keys))
            return {k: k.upper() for k in keys if k != "absent"}

        before = b.stats()
        results = await b.fetch_many(["in-memory", "in-redis", "new", "absent"], batch)
        assert {k: (r.value, r.stale, r.source) for k, r in results.items()} == {
            "in-memory": ("M", False, "l1"),
            "in-redis": ("R", False, "l2"),
            "new": ("NEW", False, "loader"),
        }
        assert asked == [["new", "absent"]]  # one load for all the misses
        after = b.stats()
        assert after["hits_l1"] - before["hits_l1"] == 1
        assert after["misses_l1"] - before["misses_l1"] == 3
        assert after["hits_l2"] - before["hits_l2"] == 1
        assert after["misses_l2"] - before["misses_l2"] == 2
        # Loaded values reached both tiers (one script call), the absent key neither.
        assert await a.get("new") == "NEW"
        assert await a.get("absent") is None
        again = await b.fetch_many(["in-redis", "new"], batch)
        assert {r.source for r in again.values()} == {"l1"}
        assert len(asked) == 1

    async def test_loader_error_serves_stale_values_then_rests(
        self, make_cache: CacheFactory
    ) -> None:
        clock = Clock()
        cache = await make_cache(
            clock=clock, stale_while_revalidate=0.0, max_stale=3600.0, fail_safe_throttle=5.0
        )
        await cache.set("k1", "old1", ttl=10)
        await cache.set("k2", "old2", ttl=10)
        clock.advance(60)
        calls: list[list[str]] = []

        async def failing(keys: Any) -> dict[str, Any]:
            calls.append(list(keys))
            raise ConnectionRefusedError("database down")

        results = await cache.fetch_many(["k1", "k2"], failing)
        assert {k: (r.value, r.stale) for k, r in results.items()} == {
            "k1": ("old1", True),
            "k2": ("old2", True),
        }
        assert len(calls) == 1
        # Throttled: the failing loader rests instead of being asked by every batch.
        assert (await cache.fetch_many(["k1"], failing))["k1"].value == "old1"
        assert len(calls) == 1
        # A key with nothing to fall back on: the loader's error propagates.
        with pytest.raises(ConnectionRefusedError):
            await cache.fetch_many(["k1", "k2", "k3"], failing)
        clock.advance(6)

        async def working(keys: Any) -> dict[str, Any]:
            return {k: f"new-{k}" for k in keys}

        results = await cache.fetch_many(["k1", "k2"], working)
        assert {k: (r.value, r.stale, r.source) for k, r in results.items()} == {
            "k1": ("new-k1", False, "loader"),
            "k2": ("new-k2", False, "loader"),
        }

    async def test_an_entry_expired_in_redis_is_replaced_by_the_load(
        self, make_cache: CacheFactory
    ) -> None:
        """SET NX alone would keep the expired entry (it lives on until max_stale) and every
        batch, in every process, would load the key again."""
        clock = Clock()
        a = await make_cache(clock=clock, stale_while_revalidate=0.0)
        b = await make_cache(clock=clock, stale_while_revalidate=0.0)
        await a.set("x", "old", ttl=10)
        await eventually(lambda: _heard_everything(b), timeout=2.0, interval=0.01)
        clock.advance(60)

        async def batch(keys: Any) -> dict[str, Any]:
            return dict.fromkeys(keys, "new")

        assert (await a.fetch_many(["x"], batch))["x"].source == "loader"
        from_redis = await b.fetch_many(["x"], batch)
        assert (from_redis["x"].value, from_redis["x"].source) == ("new", "l2")

    async def test_a_key_deleted_while_loading_is_answered_but_not_cached(
        self, make_cache: CacheFactory
    ) -> None:
        a, b = await make_cache(), await make_cache()
        loading, release = asyncio.Event(), asyncio.Event()

        async def slow(keys: Any) -> dict[str, Any]:
            loading.set()
            await release.wait()
            return dict.fromkeys(keys, "before-the-change")

        task = asyncio.create_task(b.fetch_many(["d"], slow))
        await loading.wait()
        await b.delete("d")  # the change committed while the old value was being read
        release.set()
        assert (await task)["d"].value == "before-the-change"
        assert "d" not in b.l1
        assert await a.get("d") is None


def _fresh(value: Any, source: str) -> Any:
    from surge.kit.cache import CacheResult

    return CacheResult(value, False, source)  # type: ignore[arg-type]


async def _fresh_is(cache: Cache, key: str, value: Any, loader_value: Any = None) -> bool:
    result = await cache.fetch(key, Counter(loader_value))
    return not result.stale and bool(result.value == value)


async def _absent(cache: Cache, key: str) -> bool:
    return key not in cache.l1


async def _gone(cache: Cache, key: str) -> bool:
    return bool(await cache.get(key, "MISS") == "MISS")


async def _recovered(cache: Cache) -> bool:
    return not cache.stats()["degraded"] and cache.gateway.is_up


async def _heard_everything(cache: Cache) -> bool:
    published = int(await cache.gateway.raw.get(f"{cache.namespace}:seq") or 0)
    return cache._last_seq >= published


async def _l2_lacks(cache: Cache, key: str) -> bool:
    return bool(await cache.get(key, "MISS") == "MISS")


async def test_a_slot_waiter_cancelled_and_dropped_by_give_stays_a_cancellation() -> None:
    # Seen under surge load: a request timed out while waiting for an L2 slot, a give()
    # dropped its cancelled waiter before it ran, and the waiter's cleanup raised
    # ValueError (a 500) instead of letting the cancellation through.
    from surge.kit.cache._l1 import Slots

    slots = Slots(1)
    assert slots.try_take()
    waiting = asyncio.get_running_loop().create_task(slots.take())
    await asyncio.sleep(0)  # it is waiting on its future now
    waiting.cancel()
    slots.give()  # drops the cancelled waiter, frees the slot
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert slots.used == 0
    assert slots.try_take()
