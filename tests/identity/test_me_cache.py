"""``GET /api/v1/me`` from the user cache tiers (issue 19, ADR 0016).

Warm, ``/me`` needs no pooled connection: it answers with every connection of the pool held
by someone else. Cold with the pool held, it is a 503 to retry (busy, not down). A write to
a field it shows (MFA enrolment) reaches every process's memory and Redis at commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from surge.kit.db import Database
from tests.fixtures.clients import app_client
from tests.fixtures.factories import bearer, identity_of, identity_settings, login, register
from tests.fixtures.waiting import eventually
from tests.identity.test_pool_exhaustion import pool_held, small_pool

__all__ = ["small_pool"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(120)


async def test_warm_me_needs_no_pooled_connection(
    small_pool: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, api = small_pool
    email, user_id = await register(api)
    warm_tokens = await login(api, email)
    first = await api.get("/api/v1/me", headers=bearer(warm_tokens))
    assert first.status_code == 200, first.text
    assert first.json()["id"] == user_id
    assert first.json()["email"] == email
    assert first.json()["mfa_enabled"] is False

    cold_email, _ = await register(api)
    cold_tokens = await login(api, cold_email)
    # The cold user's privileges are cached (the hook needs them); their /me view is not.
    assert (await api.get("/api/v1/me/privileges", headers=bearer(cold_tokens))).status_code == 200
    await identity_of(app).users.cache.clear()

    await api.get("/api/v1/me", headers=bearer(warm_tokens))  # warm again after the clear
    db: Database = app.state.runtime.db
    async with pool_held(db):
        warm = [await api.get("/api/v1/me", headers=bearer(warm_tokens)) for _ in range(5)]
        cold = await api.get("/api/v1/me", headers=bearer(cold_tokens))
    assert [r.status_code for r in warm] == [200] * 5
    assert all(r.content == first.content for r in warm)
    # Nothing cached and no connection: a 503 to retry, never a 500 or a wrong body.
    assert cold.status_code == 503, cold.text
    assert cold.headers["content-type"].startswith("application/problem+json")
    assert int(cold.headers["Retry-After"]) >= 1
    assert (await api.get("/api/v1/me", headers=bearer(cold_tokens))).status_code == 200


@pytest.fixture
async def two_processes(
    server_urls: tuple[str, str],
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, FastAPI, httpx.AsyncClient]]:
    """Two apps on one PostgreSQL and Redis: two web processes' memories."""
    from surge.app import create_app

    one = create_app(identity_settings(*server_urls))
    two = create_app(identity_settings(*server_urls))
    async for api_one in app_client(one):
        async for api_two in app_client(two):
            yield one, api_one, two, api_two


async def test_mfa_enrolment_reaches_every_process(
    two_processes: tuple[FastAPI, httpx.AsyncClient, FastAPI, httpx.AsyncClient],
) -> None:
    one, api_one, _, api_two = two_processes
    email, _ = await register(api_one)
    tokens = await login(api_one, email)
    for api in (api_one, api_two):  # both memories and Redis hold "mfa_enabled": false
        me = await api.get("/api/v1/me", headers=bearer(tokens))
        assert me.json()["mfa_enabled"] is False

    setup = await api_one.post("/api/v1/auth/mfa/setup", headers=bearer(tokens))
    assert setup.status_code == 200, setup.text
    code = identity_of(one).totp.now(setup.json()["secret"])
    verify = await api_one.post(
        "/api/v1/auth/mfa/verify", json={"code": code}, headers=bearer(tokens)
    )
    assert verify.status_code == 200, verify.text

    # The writer's process answers the new value at once (deleted before the response).
    me_one = await api_one.get("/api/v1/me", headers=bearer(tokens))
    assert me_one.json()["mfa_enabled"] is True

    async def other_process_sees_it() -> bool:
        me = await api_two.get("/api/v1/me", headers=bearer(tokens))
        return bool(me.json()["mfa_enabled"])

    await eventually(other_process_sees_it)
