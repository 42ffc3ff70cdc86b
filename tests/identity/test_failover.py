"""Seed 003's failover matrix and revocation without Redis, with servers these tests start,
stop and restart themselves (never the session's)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from surge.identity.privileges import PrivilegesUnavailable
from surge.kit.db import migrate
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.fixtures.clients import app_client
from tests.fixtures.factories import (
    PASSWORD,
    bearer,
    identity_of,
    identity_settings,
    login,
    make_admin,
    register,
)
from tests.fixtures.servers import start_postgres, start_redis
from tests.fixtures.waiting import eventually

NAMESPACE = "surge:identity:priv"

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def own_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedRedis]]:
    base: Path = tmp_path_factory.mktemp("identity-chaos")
    pg = start_postgres(base / "pg")
    redis = start_redis(base / "redis")
    migrate.upgrade(pg.url)
    yield pg, redis
    redis.stop()
    pg.stop("immediate")


@pytest.fixture
async def own(
    own_servers: tuple[EmbeddedPostgres, EmbeddedRedis],
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, EmbeddedPostgres, EmbeddedRedis]]:
    from surge.app import create_app

    pg, redis = own_servers
    # Make sure each test starts with both servers up, whatever the previous one did.
    if pg.pid() is None:
        await asyncio.to_thread(pg.start)
    if redis.pid() is None:
        await asyncio.to_thread(redis.start)
    app = create_app(identity_settings(pg.url, redis.url))
    async for client in app_client(app):
        yield app, client, pg, redis


class TestRevocationWithoutRedis:
    async def test_logout_with_redis_stopped_holds_and_survives_redis_return(
        self, own: tuple[FastAPI, httpx.AsyncClient, EmbeddedPostgres, EmbeddedRedis]
    ) -> None:
        app, api, _, redis = own
        identity = identity_of(app)
        email, _ = await register(api)
        leaving, staying = await login(api, email), await login(api, email)
        await asyncio.to_thread(redis.stop)
        assert (await api.post("/api/v1/auth/logout", headers=bearer(leaving))).status_code == 204
        assert not app.state.runtime.redis.is_up
        # Checked against PostgreSQL while Redis is down:
        assert (await api.get("/api/v1/me", headers=bearer(leaving))).status_code == 401
        assert (await api.get("/api/v1/me", headers=bearer(staying))).status_code == 200
        # Redis comes back without the revocation (it was down when it happened); the
        # replay from PostgreSQL must put it there before Redis answers alone again.
        await asyncio.to_thread(redis.start)
        await eventually(lambda: app.state.runtime.redis.is_up, message="Redis not back")
        resync = identity.revocations._resync
        assert resync is not None
        await asyncio.wait_for(resync, 10)
        assert (await api.get("/api/v1/me", headers=bearer(leaving))).status_code == 401
        assert (await api.get("/api/v1/me", headers=bearer(staying))).status_code == 200

    async def test_refresh_reuse_with_redis_stopped_revokes(
        self, own: tuple[FastAPI, httpx.AsyncClient, EmbeddedPostgres, EmbeddedRedis]
    ) -> None:
        _, api, _, redis = own
        email, _ = await register(api)
        tokens = await login(api, email)
        await asyncio.to_thread(redis.stop)
        ok = await api.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert ok.status_code == 200
        replay = await api.post(
            "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        assert replay.status_code == 401
        assert (await api.get("/api/v1/me", headers=bearer(ok.json()))).status_code == 401


class TestPrivilegeFailover:
    async def test_redis_down_reads_the_database(
        self, own: tuple[FastAPI, httpx.AsyncClient, EmbeddedPostgres, EmbeddedRedis]
    ) -> None:
        app, api, _, redis = own
        _, admin, _ = await make_admin(app, api)
        email, user_id = await register(api)
        tokens = await login(api, email)
        await asyncio.to_thread(redis.stop)
        started = time.monotonic()
        body = (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()
        assert body["source"] == "database"
        assert body["plan"] == "free"
        # A plan change with Redis down still reaches this process at once.
        response = await api.put(
            f"/api/admin/users/{user_id}/plan", json={"plan": "pro"}, headers=bearer(admin)
        )
        assert response.status_code == 204
        body = (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()
        assert body["plan"] == "pro"
        assert time.monotonic() - started < 5  # no per-call Redis timeouts piling up

    async def test_database_down_serves_stale_then_both_down_503_never_free(
        self, own: tuple[FastAPI, httpx.AsyncClient, EmbeddedPostgres, EmbeddedRedis]
    ) -> None:
        app, api, pg, redis = own
        _, admin, _ = await make_admin(app, api)
        email, user_id = await register(api)
        tokens = await login(api, email)
        response = await api.put(
            f"/api/admin/users/{user_id}/plan", json={"plan": "ultra"}, headers=bearer(admin)
        )
        assert response.status_code == 204
        store = identity_of(app).privileges
        uid, stranger = uuid.UUID(user_id), uuid.uuid4()
        assert (await store.get(uid)).plan == "ultra"
        store.cache.l1_ttl = 0.0  # memory no longer trusted alone: every read asks Redis
        store.forget_all_local()
        await asyncio.to_thread(pg.stop, "immediate")
        # DB down, Redis up: Redis still has the entry.
        served = (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()
        assert (served["plan"], served["source"]) == ("ultra", "redis")
        # DB down, Redis entry gone: the memory entry is served, marked stale.
        await app.state.runtime.redis.raw.delete(
            *await app.state.runtime.redis.raw.keys(f"{NAMESPACE}:*{user_id}")
        )
        stale = await store.get(uid)
        assert (stale.plan, stale.source) == ("ultra", "stale")
        with pytest.raises(PrivilegesUnavailable):  # nothing cached: never the free tier
            await store.get(stranger)
        # Both down: what memory has (stale), else a 503 (issue 19: never downgraded).
        await asyncio.to_thread(redis.stop)
        both = await store.get(uid)
        assert both.plan == "ultra"
        assert both.source in {"memory", "stale"}  # Redis cannot contradict it: still fresh
        with pytest.raises(PrivilegesUnavailable) as raised:
            await store.get(stranger)
        assert raised.value.headers["Retry-After"] == "5"
        assert await store.has_privilege(uid, "sso")
        # Over HTTP with both down the session cannot be checked: 503, never a false 200.
        response = await api.get("/api/v1/me/privileges", headers=bearer(tokens))
        assert response.status_code == 503
        assert response.headers["retry-after"]
        await asyncio.to_thread(pg.start)
        await asyncio.to_thread(redis.start)


class TestLockOutWithoutRedis:
    async def test_per_process_counters_still_let_a_trusted_device_in(
        self, own: tuple[FastAPI, httpx.AsyncClient, EmbeddedPostgres, EmbeddedRedis]
    ) -> None:
        """With Redis down the failure counters are this process's (ADR 0009); the device
        budgets fall back with them (ADR 0044): the account locks, the owner's device not."""
        app, api, _, redis = own
        guard = identity_of(app).login_guard
        guard.max_per_account, guard.max_per_device, guard.max_per_ip = 2, 2, 1_000
        email, _ = await register(api)
        device = (await login(api, email))["device_token"]
        api.cookies.clear()  # from here on an untrusted client, unless it sends ``device``
        await asyncio.to_thread(redis.stop)
        wrong = {"email": email, "password": "wrong-guess-123"}
        guesses = [(await api.post("/api/v1/auth/login", json=wrong)).status_code for _ in range(3)]
        assert guesses == [401, 401, 429]
        right = {"email": email, "password": PASSWORD}
        assert (await api.post("/api/v1/auth/login", json=right)).status_code == 429
        trusted = await api.post("/api/v1/auth/login", json={**right, "device_token": device})
        assert trusted.status_code == 200, trusted.text
