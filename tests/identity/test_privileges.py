"""Plans, privileges through memory → Redis → PostgreSQL, the active_subscriptions view,
the audit log and the batch check — against the session's real servers."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text
from structlog.testing import capture_logs

from surge.config import Settings
from surge.identity import repository
from surge.identity.plans import Grant
from surge.identity.service import identity as identity_service
from surge.kit.db import Database, PoolConfig
from surge.kit.telemetry import metrics
from surge.kit.telemetry.metrics import flush_all
from tests.fixtures.clock import Clock
from tests.fixtures.factories import (
    FAST_ARGON2,
    bearer,
    identity_of,
    login,
    make_admin,
    register,
)
from tests.fixtures.servers import free_port, serve_env, surge_process
from tests.fixtures.waiting import eventually


async def _set_plan(
    api: httpx.AsyncClient, admin: dict[str, str], user_id: str, plan: str, **extra: str
) -> httpx.Response:
    return await api.put(
        f"/api/admin/users/{user_id}/plan", json={"plan": plan, **extra}, headers=bearer(admin)
    )


class TestPlanChange:
    async def test_plan_change_updates_privileges_and_is_audited(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        _, admin, _ = await make_admin(id_app, api)
        email, user_id = await register(api)
        tokens = await login(api, email)
        before = (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()
        assert before["plan"] == "free"
        assert before["features"] == ["basic"]
        assert before["rate_tier"] == "free"
        assert (await _set_plan(api, admin, user_id, "pro")).status_code == 204
        after = (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()
        assert after["plan"] == "pro"
        assert "api_access" in after["features"]
        assert after["rate_tier"] == "pro"
        log = (
            await api.get(
                f"/api/admin/audit-log?subject_type=user&subject_id={user_id}",
                headers=bearer(admin),
            )
        ).json()
        [entry] = log["items"]
        assert entry["action"] == "identity.plan.changed"
        assert entry["before"] == {"plan": "free", "expires_at": None}
        assert entry["after"] == {"plan": "pro", "expires_at": None}
        assert entry["actor_id"] == identity_of(id_app).codec.verify(admin["access_token"])["sub"]
        assert entry["request_id"]

    async def test_unknown_plan_is_422_and_changes_nothing(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        _, admin, _ = await make_admin(id_app, api)
        _, user_id = await register(api)
        response = await _set_plan(api, admin, user_id, "platinum")
        assert response.status_code == 422
        assert "free" in response.json()["plans"]
        log = await api.get(
            f"/api/admin/audit-log?subject_type=user&subject_id={user_id}", headers=bearer(admin)
        )
        assert log.json()["items"] == []

    async def test_expired_subscription_is_free(
        self, api: httpx.AsyncClient, id_app: FastAPI, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, admin, _ = await make_admin(id_app, api)
        _, user_id = await register(api)
        store = identity_of(id_app).privileges
        clock = Clock(float(int(time.time())))  # whole seconds: expiry compares exactly
        monkeypatch.setattr(store, "clock", clock)
        soon = datetime.fromtimestamp(clock.now + 3600, UTC).isoformat()
        assert (await _set_plan(api, admin, user_id, "ultra", expires_at=soon)).status_code == 204
        runtime = id_app.state.runtime
        assert await identity_service.has_privilege(runtime, uuid.UUID(user_id), "sso")
        assert (await store.get(uuid.UUID(user_id))).source == "memory"  # held in memory
        clock.now += 3600 - 1
        assert await identity_service.has_privilege(runtime, uuid.UUID(user_id), "sso")
        clock.now += 1
        # Still cached in memory, but expiry is checked on every read.
        assert store.peek(uuid.UUID(user_id)) is None
        assert not await identity_service.has_privilege(runtime, uuid.UUID(user_id), "sso")
        assert (await identity_service.privileges_of(runtime, uuid.UUID(user_id))).plan == "free"


class TestFillsFromALaggingReplica:
    """ADR 0060: the tiers are filled from the primary. The app's only replica has replayed
    none of the suite's writes (``lagging_replica_url``): before the fix, the fill that
    followed a plan change's invalidation read it there and cached the old plan for the
    hour of ADR 0050."""

    @pytest.fixture
    def app_settings(self, id_settings: Settings, lagging_replica_url: str) -> Settings:
        return id_settings.model_copy(update={"DATABASE_REPLICA_URLS": [lagging_replica_url]})

    async def test_a_user_who_just_paid_is_not_answered_free_for_an_hour(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        _, admin, _ = await make_admin(id_app, api)
        email, user_id = await register(api)
        tokens = await login(api, email)
        assert (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()[
            "plan"
        ] == "free"
        assert (await _set_plan(api, admin, user_id, "pro")).status_code == 204
        for _ in range(2):  # the fill after the invalidation, then what it cached
            own = (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()
            assert own["plan"] == "pro"
        store = identity_of(id_app).privileges
        await store.invalidate(uuid.UUID(user_id))  # the batch path fills too
        [(_, found)] = (await store.get_many([uuid.UUID(user_id)])).items()
        assert (found.plan, found.source) == ("pro", "database")


class TestTiers:
    async def test_memory_then_redis_then_database(
        self, api: httpx.AsyncClient, id_app: FastAPI, redis_client: object
    ) -> None:
        _, user_id = await register(api)
        store = identity_of(id_app).privileges
        uid = uuid.UUID(user_id)
        assert (await store.get(uid)).source == "database"
        assert (await store.get(uid)).source == "memory"
        store.forget_all_local()
        assert (await store.get(uid)).source == "redis"
        assert (await store.get(uid)).source == "memory"

    async def test_invalidation_reaches_other_process_memory(
        self, api: httpx.AsyncClient, id_app: FastAPI, id_settings: object
    ) -> None:
        """Two Identity instances (two processes' worth of memory) on the same Redis."""
        from surge.identity.runtime import install_identity
        from surge.kit.runtime import Runtime

        _, admin, _ = await make_admin(id_app, api)
        _, user_id = await register(api)
        uid = uuid.UUID(user_id)
        other_runtime = Runtime(id_settings)  # type: ignore[arg-type]
        await other_runtime.start()
        other = install_identity(other_runtime)
        await other.start(warm=False, refresh_view=False)
        try:
            await asyncio.wait_for(other.privileges.cache.wait_listening(), 5)
            assert (await other.privileges.get(uid)).plan == "free"
            assert (await other.privileges.get(uid)).source == "memory"
            assert (await _set_plan(api, admin, user_id, "plus")).status_code == 204

            async def plus() -> bool:
                return (await other.privileges.get(uid)).plan == "plus"

            await eventually(plus, timeout=1.0, interval=0.01, message="plan change not heard")
        finally:
            await other.close()
            await other_runtime.stop()


class TestMaterializedView:
    async def test_refresh_fills_the_view_and_later_changes_overlay_it(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        _, admin, _ = await make_admin(id_app, api)
        _, user_id = await register(api)
        runtime = id_app.state.runtime
        assert (await _set_plan(api, admin, user_id, "plus")).status_code == 204
        async with runtime.db.session() as session:
            assert await identity_service.refresh_view(session)
        async with runtime.db.read_session() as session:
            plan = await session.scalar(
                text("SELECT plan FROM active_subscriptions WHERE user_id = :u"), {"u": user_id}
            )
        assert plan == "plus"
        # A change after the refresh is read through the overlay, not the stale view row.
        assert (await _set_plan(api, admin, user_id, "ultra")).status_code == 204
        identity_of(id_app).privileges.forget_all_local()
        privileges = await identity_service.privileges_of(runtime, uuid.UUID(user_id))
        assert privileges.plan == "ultra"
        # A refresh that is not due is skipped (one refresh per interval cluster-wide).
        async with runtime.db.session() as session:
            assert not await identity_service.refresh_view(session, min_age=60)

    async def test_a_periodic_refresh_is_skipped_only_when_it_would_change_nothing(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """Issue 19: rebuilding the view of every paying user each minute when no plan moved
        was the load run's latency spike. Skipped then; never after a write or a delete."""
        _, admin, _ = await make_admin(id_app, api)
        _, user_id = await register(api)
        runtime = id_app.state.runtime
        assert (await _set_plan(api, admin, user_id, "plus")).status_code == 204
        # Writes inside the 5-minute margin (a write may commit after the refresh's
        # snapshot) count only if the view does not show them: the plan change just made
        # is well inside it.

        async def periodic() -> bool:
            async with runtime.db.session() as session:
                return await identity_service.refresh_view(session, min_age=1e-6)

        async def refreshed_at() -> object:
            async with runtime.db.read_session() as session:
                return await session.scalar(
                    text("SELECT refreshed_at FROM view_refreshes "
                         "WHERE name = 'active_subscriptions'")
                )  # fmt: skip

        assert await periodic()  # the write above is not in the view yet
        mark = await refreshed_at()
        assert not await periodic()  # nothing changed: skipped, the mark left alone
        assert await refreshed_at() == mark
        assert (await _set_plan(api, admin, user_id, "ultra")).status_code == 204
        assert await periodic()  # a plan change
        assert not await periodic()
        async with runtime.db.session() as session:  # a user erased: its row cascades away
            await session.execute(text("DELETE FROM users WHERE id = :u"), {"u": user_id})
            await session.commit()
        assert await periodic()
        async with runtime.db.read_session() as session:
            gone = await session.scalar(
                text("SELECT count(*) FROM active_subscriptions WHERE user_id = :u"),
                {"u": user_id},
            )
        assert gone == 0
        assert not await periodic()
        # A write that started before the last refresh's snapshot and committed after it
        # (its updated_at is before the mark, the view does not show it) is a change.
        _, other = await register(api)
        assert (await _set_plan(api, admin, other, "plus")).status_code == 204
        assert await periodic()
        async with runtime.db.session() as session:
            await session.execute(
                text("UPDATE subscriptions SET plan = 'pro', updated_at = (SELECT refreshed_at "
                     "FROM view_refreshes WHERE name = 'active_subscriptions') - interval '2 min' "
                     "WHERE user_id = :u"),
                {"u": other},
            )  # fmt: skip
            await session.commit()
        async with runtime.db.read_session() as session:
            assert not await repository.active_subscriptions_unchanged(session)
            # Outside the margin it would not be seen: the margin is what catches it.
            assert await repository.active_subscriptions_unchanged(session, margin=60)
        assert await periodic()
        assert not await periodic()

    async def test_view_has_the_indexes_seed_003_asks_for(self, id_app: FastAPI) -> None:
        async with id_app.state.runtime.db.read_session() as session:
            rows = await session.execute(
                text(
                    "SELECT indexname, indexdef FROM pg_indexes "
                    "WHERE tablename IN ('subscriptions', 'active_subscriptions')"
                )
            )
            indexes = {row[0]: row[1] for row in rows}
        assert "UNIQUE" in indexes["ux_active_subscriptions_user"]  # needed by CONCURRENTLY
        assert "WHERE (plan <> 'free'::text)" in indexes["ix_subscriptions_paid_expiry"]
        assert "(user_id, plan, expires_at)" in indexes["ix_subscriptions_user_plan_expiry"]


async def test_the_grants_query_counts_in_the_slow_query_log(server_urls: tuple[str, str]) -> None:
    """``grants`` goes to the driver directly (issue 19), past SQLAlchemy's cursor events: it
    must still be timed like every statement, or a slow plan look-up (the query behind every
    privileges miss) never shows in the slow-query log nor in its counter. Here every
    statement is slow (threshold 0)."""
    db = Database(server_urls[0], config=PoolConfig(min_size=0, max_size=2, slow_query=0.0))
    counter = metrics.DB_SLOW_QUERIES.labels("primary")
    before = counter._value.get()
    unknown = uuid.uuid4()
    try:
        with capture_logs() as logs:
            async with db.read_session() as session:
                found = await repository.grants(session, [unknown])
        assert found == {unknown: Grant(plan="free", expires_at=None, found=False)}
        slow = [
            entry
            for entry in logs
            if entry["event"] == "db.slow_query" and "active_subscriptions" in entry["statement"]
        ]
        assert len(slow) == 1, logs
        assert counter._value.get() >= before + 1
    finally:
        await db.close()


class TestBatch:
    async def test_batch_of_100(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        _, admin, _ = await make_admin(id_app, api)
        users = [(await register(api))[1] for _ in range(3)]
        assert (await _set_plan(api, admin, users[1], "pro")).status_code == 204
        unknown = [str(uuid.uuid4()) for _ in range(97)]
        response = await api.post(
            "/api/v1/privileges/batch",
            json={"user_ids": users + unknown, "feature": "api_access"},
            headers=bearer(admin),
        )
        assert response.status_code == 200
        results = response.json()["results"]
        assert [r["user_id"] for r in results] == users + unknown
        assert [r["allowed"] for r in results[:3]] == [False, True, False]
        assert all(r["found"] for r in results[:3])
        assert not any(r["found"] for r in results[3:])
        too_many = await api.post(
            "/api/v1/privileges/batch",
            json={"user_ids": [str(uuid.uuid4()) for _ in range(101)]},
            headers=bearer(admin),
        )
        assert too_many.status_code == 422

    async def test_each_lookup_counted_once_by_the_tier_that_answered(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """Issue 19: the batch loaded its misses, then counted every user as a memory hit
        (the load run read 99.95-100 % hits). One user per tier here."""
        _, admin, _ = await make_admin(id_app, api)
        users = [uuid.UUID((await register(api))[1]) for _ in range(4)]
        assert (await _set_plan(api, admin, str(users[0]), "pro")).status_code == 204
        store = identity_of(id_app).privileges
        raw = id_app.state.runtime.redis.raw
        for user_id in users:
            for key in await raw.keys(f"surge:identity:priv:*{user_id}"):
                await raw.delete(key)
        store.forget_all_local()
        await store.get(users[0])
        store.forget_all_local()  # users[0]: in Redis only
        await store.get(users[1])  # users[1]: in memory (and Redis)
        # users[2] and users[3]: nowhere but PostgreSQL
        before = _lookups()
        batch_before = _lookups("surge_privilege_batch_lookups_total")
        found = await store.get_many([*users, users[1]])
        assert [found[u].source for u in users] == ["redis", "memory", "database", "database"]
        assert found[users[0]].plan == "pro"
        counted = {s: n - before[s] for s, n in _lookups().items()}
        assert counted == {
            "memory": 1,
            "redis": 1,
            "database": 2,
            "stale": 0,
            "unavailable": 0,
        }
        again = await store.get_many(users)
        assert {p.source for p in again.values()} == {"memory"}
        assert _lookups()["memory"] - before["memory"] == 1 + 4
        # The batch's lookups are counted apart too (ADR 0041); a user's own is not.
        await store.get(users[0])
        batch = _lookups("surge_privilege_batch_lookups_total")
        assert {s: n - batch_before[s] for s, n in batch.items()} == {
            "memory": 1 + 4,
            "redis": 1,
            "database": 2,
            "stale": 0,
            "unavailable": 0,
        }


def _lookups(name: str = "surge_privilege_lookups_total") -> dict[str, float]:
    flush_all()
    return {
        source: REGISTRY.get_sample_value(name, {"source": source}) or 0.0
        for source in ("memory", "redis", "database", "stale", "unavailable")
    }


@pytest.mark.timeout(90)
async def test_plan_change_reaches_another_process_within_1s(
    api: httpx.AsyncClient, id_app: FastAPI, server_urls: tuple[str, str]
) -> None:
    """A real second process (``surge serve``) answers /me/privileges from its memory; a plan
    change made here must show there within a second."""
    _, admin, _ = await make_admin(id_app, api)
    email, user_id = await register(api)
    tokens = await login(api, email)
    port = free_port()
    env = serve_env(*server_urls, **{f"SURGE_{k}": str(v) for k, v in FAST_ARGON2.items()})
    url = f"http://127.0.0.1:{port}"
    with surge_process(
        ["serve", "--workers", "1", "--port", str(port), "--no-servers"],
        env,
        ready_url=f"{url}/readyz",
    ):
        async with httpx.AsyncClient(base_url=url, timeout=5) as remote:
            first = await remote.get("/api/v1/me/privileges", headers=bearer(tokens))
            assert first.json()["plan"] == "free"
            second = await remote.get("/api/v1/me/privileges", headers=bearer(tokens))
            assert second.json()["source"] == "memory"
            assert (await _set_plan(api, admin, user_id, "ultra")).status_code == 204

            async def ultra() -> bool:
                reply = await remote.get("/api/v1/me/privileges", headers=bearer(tokens))
                return bool(reply.json()["plan"] == "ultra")

            await eventually(ultra, timeout=1.0, message="the other process kept the old plan")


class TestRefreshJob:
    async def test_registered_every_minute_and_refreshes(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        from surge.identity.jobs import refresh_active_subscriptions_job
        from surge.kit.jobs import JobContext
        from surge.kit.jobs.registry import get_spec

        spec = get_spec("identity.active_subscriptions.refresh")
        assert spec is not None
        assert spec.cron is not None
        slot = datetime(2026, 11, 22, 3, 0, 30, tzinfo=UTC)
        assert spec.next_run(slot) == datetime(2026, 11, 22, 3, 1, tzinfo=UTC)
        _, admin, _ = await make_admin(id_app, api)
        _, user_id = await register(api)
        assert (await _set_plan(api, admin, user_id, "pro")).status_code == 204
        runtime = id_app.state.runtime
        async with runtime.db.session() as session:
            # Make the last refresh look old enough for the job's "not twice a minute" rule.
            await session.execute(
                text("UPDATE view_refreshes SET refreshed_at = now() - interval '2 minutes'")
            )
        async with runtime.db.session() as session:
            ctx = JobContext(
                id=1, name=spec.name, queue=spec.queue, payload={}, attempt=1, token=1,
                stalls=0, runtime=runtime, session_factory=lambda: session,
            )  # fmt: skip
            await refresh_active_subscriptions_job(ctx)
        async with runtime.db.read_session() as session:
            plan = await session.scalar(
                text("SELECT plan FROM active_subscriptions WHERE user_id = :u"), {"u": user_id}
            )
        assert plan == "pro"
