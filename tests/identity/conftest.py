"""Identity fixtures: an app with cheap Argon2 parameters (hashing cost is not under test
here except in the rehash test), and helpers to create users and sign in."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from surge.config import Settings
from surge.identity import repository as id_repository
from surge.identity.runtime import IdentityState, identity_state
from surge.identity.service import identity as identity_service
from surge.kit.security.confusables import normalize_email
from tests.conftest import app_client, make_settings

FAST_ARGON2: dict[str, Any] = {
    "AUTH_ARGON2_TIME_COST": 1,
    "AUTH_ARGON2_MEMORY_KIB": 1024,
    "AUTH_ARGON2_PARALLELISM": 1,
}
PASSWORD = "correct horse battery staple"


def identity_settings(database_url: str, redis_url: str, **overrides: Any) -> Settings:
    return make_settings(database_url, redis_url, **{**FAST_ARGON2, **overrides})


@pytest.fixture(scope="session")
def id_settings(server_urls: tuple[str, str]) -> Settings:
    return identity_settings(*server_urls)


@pytest.fixture
async def id_app(id_settings: Settings) -> FastAPI:
    from surge.app import create_app

    return create_app(id_settings)


@pytest.fixture
async def api(id_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(id_app):
        yield client


def identity_of(app: FastAPI) -> IdentityState:
    """The app process's identity state (codec, hasher, stores, login guard...)."""
    return identity_state(app.state.runtime)


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


async def register(api: httpx.AsyncClient, email: str | None = None) -> tuple[str, str]:
    """Register a user through the API; returns (email, user id)."""
    email = email or unique_email()
    response = await api.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert response.status_code == 202, response.text  # the same answer for every address
    # The answer names no account (issue 16): the id is read from the app's database, not
    # from a sign-in (which would spend the user's rate budget and leave a session).
    transport = api._transport
    assert isinstance(transport, httpx.ASGITransport)
    app = transport.app
    async with app.state.runtime.db.session() as session:  # type: ignore[attr-defined]
        user = await id_repository.user_by_email(session, normalize_email(email))
    assert user is not None, email
    return email, str(user.id)


async def login(
    api: httpx.AsyncClient, email: str, *, otp: str | None = None, **headers: str
) -> dict[str, Any]:
    body: dict[str, Any] = {"email": email, "password": PASSWORD}
    if otp is not None:
        body["otp"] = otp
    response = await api.post("/api/v1/auth/login", json=body, headers=headers)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def bearer(tokens: dict[str, Any] | str) -> dict[str, str]:
    token = tokens if isinstance(tokens, str) else tokens["access_token"]
    return {"Authorization": f"Bearer {token}"}


async def make_admin(app: FastAPI, api: httpx.AsyncClient) -> tuple[str, dict[str, Any], str]:
    """An admin with MFA enrolled and verified: (email, tokens with an MFA access token, secret)."""
    email = unique_email("admin")
    identity = identity_of(app)
    async with app.state.runtime.db.session() as session:
        await identity_service.register(
            session, app.state.runtime, email=email, password=PASSWORD, role="admin"
        )
    tokens = await login(api, email)
    setup = await api.post("/api/v1/auth/mfa/setup", headers=bearer(tokens))
    assert setup.status_code == 200, setup.text
    secret = setup.json()["secret"]
    verify = await api.post(
        "/api/v1/auth/mfa/verify", json={"code": identity.totp.now(secret)}, headers=bearer(tokens)
    )
    assert verify.status_code == 200, verify.text
    tokens = {**tokens, "access_token": verify.json()["access_token"]}
    return email, tokens, secret
