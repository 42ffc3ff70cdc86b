"""Issue 19: a busy pool or a slow database never answers a paying user as free.

Under load a privilege lookup that waited too long for a pooled connection was taken for
"PostgreSQL is down" and answered from the free plan with a 200. Here the app's whole pool
(2 connections) is held by the test, or the table the lookup reads is locked so the database
is slow; paying users are then either answered with their real plan from a cache tier, or
refused with 503 + ``Retry-After`` (504 when the slow query outlives the request timeout) —
never 200 "free". Health keeps saying the database is up: it is busy, not down.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url

from surge.kit.db import Database
from tests.fixtures.clients import app_client
from tests.fixtures.factories import (
    bearer,
    identity_of,
    identity_settings,
    login,
    make_admin,
    register,
)

NAMESPACE = "surge:identity:priv"
PAYING = 6

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def small_pool(
    server_urls: tuple[str, str],
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    from surge.app import create_app

    app = create_app(
        identity_settings(
            *server_urls,
            DB_POOL_MAX=2,
            DB_POOL_MIN=1,
            DB_POOL_TIMEOUT=0.3,
            REQUEST_TIMEOUT=1.5,
        )
    )
    async for client in app_client(app):
        yield app, client


@asynccontextmanager
async def pool_held(db: Database) -> AsyncIterator[None]:
    """Every pooled connection checked out (and used) by someone else."""
    held = [await db.primary.connect() for _ in range(db.config.max_size)]
    try:
        for connection in held:
            await connection.execute(text("SELECT 1"))
        yield
    finally:
        for connection in held:
            await connection.close()


async def paying_users(app: FastAPI, api: httpx.AsyncClient) -> list[tuple[str, dict[str, Any]]]:
    _, admin, _ = await make_admin(app, api)
    users = []
    for _ in range(PAYING):
        email, user_id = await register(api)
        response = await api.put(
            f"/api/admin/users/{user_id}/plan", json={"plan": "pro"}, headers=bearer(admin)
        )
        assert response.status_code == 204
        users.append((user_id, await login(api, email)))
    return users


async def forget_everywhere(app: FastAPI, user_ids: list[str]) -> None:
    identity_of(app).privileges.forget_all_local()
    raw = app.state.runtime.redis.raw
    for user_id in user_ids:
        keys = await raw.keys(f"{NAMESPACE}:*{user_id}")
        if keys:
            await raw.delete(*keys)


def assert_never_free(responses: list[httpx.Response]) -> None:
    for response in responses:
        if response.status_code == 200:
            assert response.json()["plan"] == "pro", response.text
        else:
            assert response.status_code in {503, 504}, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            if response.status_code == 503:
                assert int(response.headers["Retry-After"]) >= 1


async def burst(
    api: httpx.AsyncClient, users: list[tuple[str, dict[str, Any]]]
) -> list[httpx.Response]:
    return list(
        await asyncio.gather(
            *(api.get("/api/v1/me/privileges", headers=bearer(tokens)) for _, tokens in users * 3)
        )
    )


async def test_exhausted_pool_serves_cached_plans_or_503_never_free(
    small_pool: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, api = small_pool
    users = await paying_users(app, api)
    ids = [user_id for user_id, _ in users]
    db: Database = app.state.runtime.db
    # Half the users have their plan in Redis; the other half nowhere but PostgreSQL.
    await forget_everywhere(app, ids)
    for _, tokens in users[: PAYING // 2]:
        body = (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()
        assert body["plan"] == "pro"
    identity_of(app).privileges.forget_all_local()
    async with pool_held(db):
        responses = await burst(api, users)
        health = await api.get("/api/health")
    assert_never_free(responses)
    by_user: dict[str, set[int]] = {}
    for (user_id, _), response in zip(users * 3, responses, strict=True):
        by_user.setdefault(user_id, set()).add(response.status_code)
    # The cached half got their real plan; the uncached half a 503 to retry, not "free".
    for user_id in ids[: PAYING // 2]:
        assert by_user[user_id] == {200}
    for user_id in ids[PAYING // 2 :]:
        assert by_user[user_id] == {503}
    # Busy, not down: health says the database answers.
    assert health.json()["checks"]["database"] is True
    # Once the pool is free again the same users get their plan.
    for _, tokens in users:
        body = (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()
        assert body["plan"] == "pro"


async def test_batch_with_an_exhausted_pool_serves_cached_plans_or_503_never_free(
    small_pool: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, api = small_pool
    _, admin, _ = await make_admin(app, api)
    users = await paying_users(app, api)
    ids = [user_id for user_id, _ in users]
    await forget_everywhere(app, ids)
    cached, uncached = ids[: PAYING // 2], ids[PAYING // 2 :]
    warm = await api.post(
        "/api/v1/privileges/batch", json={"user_ids": cached}, headers=bearer(admin)
    )
    assert [r["plan"] for r in warm.json()["results"]] == ["pro"] * len(cached)
    identity_of(app).privileges.forget_all_local()  # Redis only, as in another process
    async with pool_held(app.state.runtime.db):
        from_redis = await api.post(
            "/api/v1/privileges/batch", json={"user_ids": cached}, headers=bearer(admin)
        )
        refused = await api.post(
            "/api/v1/privileges/batch", json={"user_ids": ids}, headers=bearer(admin)
        )
    assert from_redis.status_code == 200
    assert [r["plan"] for r in from_redis.json()["results"]] == ["pro"] * len(cached)
    # Some users have nothing cached: the whole batch is a 503 to retry, nobody is "free".
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.headers["Retry-After"] == "1"
    after = await api.post(
        "/api/v1/privileges/batch", json={"user_ids": uncached}, headers=bearer(admin)
    )
    assert [r["plan"] for r in after.json()["results"]] == ["pro"] * len(uncached)


async def test_slow_database_never_answers_paying_users_as_free(
    small_pool: tuple[FastAPI, httpx.AsyncClient], server_urls: tuple[str, str]
) -> None:
    app, api = small_pool
    users = await paying_users(app, api)
    await forget_everywhere(app, [user_id for user_id, _ in users])
    url = make_url(server_urls[0])
    locker = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password,
        database=url.database,
    )  # fmt: skip
    try:
        # A transaction that holds the subscriptions table: every lookup query waits on it,
        # the way it waits on a database slowed down by a long migration or a vacuum.
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("LOCK TABLE subscriptions IN ACCESS EXCLUSIVE MODE")
        responses = await burst(api, users)
        await transaction.rollback()
    finally:
        await locker.close()
    assert_never_free(responses)
    assert {r.status_code for r in responses} <= {503, 504}
    for _, tokens in users:
        body = (await api.get("/api/v1/me/privileges", headers=bearer(tokens))).json()
        assert body["plan"] == "pro"


async def test_pool_timeout_is_503_busy_not_database_down(
    small_pool: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, api = small_pool
    admin_email, admin, _ = await make_admin(app, api)
    async with pool_held(app.state.runtime.db):
        response = await api.put(
            f"/api/admin/users/{uuid.uuid4()}/plan", json={"plan": "pro"}, headers=bearer(admin)
        )
    assert response.status_code == 503
    assert response.json()["type"].endswith("busy")
    assert response.headers["Retry-After"] == "1"
    assert admin_email
