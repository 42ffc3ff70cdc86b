"""The caller's plan selects the rate-limit policy (identity's ``identify`` hook for
kit.ratelimit), and a plan change moves the caller to the new tier at once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from fastapi import FastAPI

from surge.identity.hook import RateLimitHook
from surge.identity.service import identity as identity_service
from surge.kit.ratelimit import Subject
from tests.fixtures.clients import app_client
from tests.fixtures.factories import (
    bearer,
    identity_of,
    identity_settings,
    login,
    make_admin,
    register,
)


@pytest.fixture
async def limited(server_urls: tuple[str, str]) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    from surge.app import create_app

    settings = identity_settings(
        *server_urls,
        RATELIMIT_ENABLED=True,
        RATELIMIT_KEY_PREFIX=f"rl-test-{uuid.uuid4().hex[:8]}:",
        RATELIMIT_POLICIES=[
            {"name": "t-free", "limit": 3, "period": "PT1M", "per": "subject", "tiers": ["free"]},
            {"name": "t-pro", "limit": 8, "period": "PT1M", "per": "subject", "tiers": ["pro"]},
        ],
    )
    app = create_app(settings)
    async for client in app_client(app):
        yield app, client


async def test_plan_selects_the_rate_limit_tier(
    limited: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, api = limited
    identity = identity_of(app)
    # The admin is on "ultra", which no policy here limits.
    _, admin, _ = await make_admin(app, api)
    admin_id = uuid.UUID(identity.codec.verify(admin["access_token"])["sub"])
    async with app.state.runtime.db.session() as session:
        await identity_service.change_plan(
            session, app.state.runtime, None, user_id=admin_id, plan="ultra", expires_at=None
        )
    email, user_id = await register(api)
    tokens = await login(api, email)
    statuses = [(await api.get("/api/v1/me", headers=bearer(tokens))).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    response = await api.put(
        f"/api/admin/users/{user_id}/plan", json={"plan": "pro"}, headers=bearer(admin)
    )
    assert response.status_code == 204
    statuses = [(await api.get("/api/v1/me", headers=bearer(tokens))).status_code for _ in range(9)]
    assert statuses == [200] * 8 + [429]


async def test_forged_token_is_anonymous_for_the_limiter(
    limited: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, api = limited
    subject = RateLimitHook(identity_of(app)).subject(
        {"type": "http", "headers": [(b"authorization", b"Bearer not.a.token")]}
    )
    assert subject is None
    email, _ = await register(api)
    tokens = await login(api, email)
    scope: dict[str, object] = {
        "type": "http",
        "headers": [(b"authorization", f"Bearer {tokens['access_token']}".encode())],
    }
    found = RateLimitHook(identity_of(app)).subject(scope)
    assert found is not None
    resolved = found if isinstance(found, Subject) else await found  # memory: no coroutine
    assert resolved is not None
    assert resolved.tier == "free"


async def test_a_signed_out_token_buys_no_user_tier(
    server_urls: tuple[str, str],
) -> None:
    """The rate-limit hook authenticates fully: a revoked token is anonymous (per-IP
    budget), so keeping an old token attached does not lift the anonymous limit."""
    from surge.app import create_app

    settings = identity_settings(
        *server_urls,
        RATELIMIT_ENABLED=True,
        RATELIMIT_KEY_PREFIX=f"rl-test-{uuid.uuid4().hex[:8]}:",
        RATELIMIT_POLICIES=[
            {"name": "t-anon", "limit": 4, "period": "PT15M", "tiers": ["anonymous"]},
            {"name": "t-free", "limit": 100, "period": "PT15M", "per": "subject"},
        ],
    )
    app = create_app(settings)
    async for api in app_client(app):
        api.headers["X-Forwarded-For"] = f"198.18.{uuid.uuid4().int % 250}.7"
        email, _ = await register(api)  # anonymous 1
        tokens = await login(api, email)  # anonymous 2
        assert (await api.post("/api/v1/auth/logout", headers=bearer(tokens))).status_code == 204
        statuses = [
            (await api.get("/api/v1/me", headers=bearer(tokens))).status_code for _ in range(4)
        ]
        assert statuses == [401, 401, 429, 429]  # anonymous 3, 4, then over the limit


async def test_me_privileges_from_the_hook_answers_as_the_route(
    limited: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    """With the limiter on, ``/me/privileges`` is sent from what the hook resolved (ADR
    0048): the same body, media type and length as the FastAPI route, the rate-limit and
    request-id headers still added; a signed-out token is never served from it."""
    app, api = limited
    email, user_id = await register(api)
    tokens = await login(api, email)
    response = await api.get("/api/v1/me/privileges", headers=bearer(tokens))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert "ratelimit" in response.headers
    assert response.headers["x-request-id"]
    expected = await identity_service.privileges_of(app.state.runtime, uuid.UUID(user_id))
    body = response.json()
    assert body["user_id"] == user_id
    assert {**body, "source": None} == {**orjson.loads(expected.json), "source": None}
    assert (await api.post("/api/v1/auth/logout", headers=bearer(tokens))).status_code == 204
    revoked = await api.get("/api/v1/me/privileges", headers=bearer(tokens))
    assert revoked.status_code == 401
    assert revoked.headers["content-type"] == "application/problem+json"
