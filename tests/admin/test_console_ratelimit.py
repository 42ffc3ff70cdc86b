"""The console's session cookie is a signed-in operator for the rate limiter (ADR 0054):
console clicks spend the operator's tier, not the anonymous 50 / 15 min of the client IP; a
forged, signed-out or revoked cookie is anonymous. The constant files the pages load (the
console's CSS and JS, the docs' bundles) spend a per-IP budget of their own."""

from __future__ import annotations

import inspect
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from surge.admin.console.session import COOKIE, ConsoleSession, load_by_id
from surge.config import Settings
from surge.identity.runtime import identity_state
from surge.identity.service import identity as identity_service
from surge.kit.ratelimit import Subject
from tests.admin.test_console import signed_in
from tests.fixtures.factories import identity_settings

#: More console page loads than the anonymous budget (seed 004: 50 per 15 min per IP).
CLICKS = 60


@pytest.fixture
def app_settings(server_urls: tuple[str, str]) -> Settings:
    # The default policies, rate limiting on, a key prefix of this test's own.
    return identity_settings(
        *server_urls,
        RATELIMIT_ENABLED=True,
        RATELIMIT_KEY_PREFIX=f"rl-console-{uuid.uuid4().hex[:8]}:",
    )


async def statuses(api: httpx.AsyncClient, path: str, **kwargs: Any) -> list[int]:
    return [(await api.get(path, **kwargs)).status_code for _ in range(CLICKS)]


async def test_console_clicks_spend_the_operators_budget(
    app: FastAPI, api: httpx.AsyncClient
) -> None:
    await signed_in(app, api)
    pages = await statuses(api, "/admin/overview")
    assert pages == [200] * CLICKS
    last = await api.get("/admin/overview")
    assert "anonymous-15m" not in last.headers["ratelimit-policy"]
    assert "tier-" in last.headers["ratelimit-policy"]


async def test_a_forged_cookie_is_anonymous(app: FastAPI, api: httpx.AsyncClient) -> None:
    forged = {"cookie": f"{COOKIE}={uuid.uuid4().hex}"}
    found = await statuses(api, "/admin/overview", headers=forged)
    assert 429 in found, found
    refused = await api.get("/admin/overview", headers=forged)
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "anonymous-15m" in refused.json()["policies"]


async def test_static_files_do_not_spend_the_anonymous_budget(api: httpx.AsyncClient) -> None:
    for path in ("/admin/static/console.css", "/admin/static/console.js", "/docs"):
        assert await statuses(api, path) == [200] * CLICKS, path
    page = await api.get("/admin")  # the sign-in page: the anonymous budget is still whole
    assert page.status_code == 200
    assert '"anonymous-15m";r=49' in page.headers["ratelimit"]
    assert "static-1m" in (await api.get("/admin/static/console.css")).headers["ratelimit"]


class TestAnOperatorsOwnPolicies:
    """ADR 0060: an operator who lists their own ``RATELIMIT_POLICIES`` keeps the constant
    routes' budget without copying it (before: every CSS, JS and docs load spent their
    anonymous tier, and the console's sign-in page was refused after a few page loads)."""

    @pytest.fixture
    def app_settings(self, server_urls: tuple[str, str]) -> Settings:
        return identity_settings(
            *server_urls,
            RATELIMIT_ENABLED=True,
            RATELIMIT_KEY_PREFIX=f"rl-console-{uuid.uuid4().hex[:8]}:",
            RATELIMIT_POLICIES=[
                {"name": "guests-15m", "limit": 50, "period": "PT15M", "tiers": ["anonymous"]},
                {"name": "ip-1m", "limit": 10000, "period": "PT1M", "per": "ip"},
            ],
        )

    async def test_static_files_keep_their_own_budget(self, api: httpx.AsyncClient) -> None:
        for path in ("/admin/static/console.css", "/docs"):
            assert await statuses(api, path) == [200] * CLICKS, path
        page = await api.get("/admin")
        assert page.status_code == 200
        assert '"guests-15m";r=49' in page.headers["ratelimit"]
        assert "static-1m" in (await api.get("/admin/static/console.css")).headers["ratelimit"]


async def identify(app: FastAPI, session_id: str) -> Subject | None:
    hook = app.state.runtime.extensions["ratelimit"].identify
    scope = {"type": "http", "path": "/admin/overview", "headers": [
        (b"cookie", f"{COOKIE}={session_id}".encode())
    ]}  # fmt: skip
    found = hook(scope)
    if inspect.isawaitable(found):
        found = await found
    assert found is None or isinstance(found, Subject)
    return found


async def test_a_revoked_session_is_anonymous(app: FastAPI, api: httpx.AsyncClient) -> None:
    await signed_in(app, api)
    session_id = api.cookies.get(COOKIE, path="/admin")
    assert session_id
    session = await load_by_id(app.state.runtime, session_id)
    assert isinstance(session, ConsoleSession)
    principal = await identity_state(app.state.runtime).authenticate(session.access)
    subject = await identify(app, session_id)
    assert subject is not None
    assert subject.id == principal.key
    async with app.state.runtime.db.session() as db:
        await identity_service.logout(db, app.state.runtime, principal, everywhere=True)
        await db.commit()
    assert await identify(app, session_id) is None
    # The console's own check agrees: the page asks to sign in again, and charges anonymous.
    page = await api.get("/admin/overview")
    assert page.status_code in {303, 401}
    assert "anonymous-15m" in page.headers["ratelimit-policy"]
