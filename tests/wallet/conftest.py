"""Wallet API fixtures: the real app (identity, jobs, cache), partners and an MFA admin
signed in through the API, and an in-process job worker on the ``wallet`` queue."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any
from uuid import UUID

import httpx
import pytest
from fastapi import FastAPI

from surge.config import Settings
from surge.identity.service import identity as identity_service
from surge.kit.jobs.worker import Worker
from surge.kit.runtime import Runtime
from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import (
    PASSWORD,
    Caller,
    bearer,
    identity_settings,
    login,
    make_admin,
    unique_email,
)
from tests.fixtures.workers import running_worker


@pytest.fixture(scope="session")
def wallet_settings(server_urls: tuple[str, str]) -> Settings:
    return identity_settings(*server_urls, WALLET_WITHDRAWAL_MIN=100)


@pytest.fixture
def app_settings(wallet_settings: Settings) -> Settings:
    return wallet_settings


@pytest.fixture
def wallet_app(app: FastAPI) -> FastAPI:
    return app


async def make_partner(app: FastAPI, api: httpx.AsyncClient, role: str = "partner") -> Caller:
    email = unique_email(role)
    async with runtime_of(app).db.session() as session:
        user = await identity_service.register(
            session, runtime_of(app), email=email, password=PASSWORD, role=role
        )
    tokens = await login(api, email)
    return Caller(id=user.id, headers=bearer(tokens))


@pytest.fixture
async def admin(wallet_app: FastAPI, api: httpx.AsyncClient) -> Caller:
    _, tokens, _ = await make_admin(wallet_app, api)
    me = await api.get("/api/v1/me", headers=bearer(tokens))
    assert me.status_code == 200, me.text
    return Caller(id=UUID(me.json()["id"]), headers=bearer(tokens))


@pytest.fixture
async def second_admin(wallet_app: FastAPI, api: httpx.AsyncClient) -> Caller:
    """Another MFA administrator: the checker of four-eyes requests (ADR 0059)."""
    _, tokens, _ = await make_admin(wallet_app, api)
    me = await api.get("/api/v1/me", headers=bearer(tokens))
    assert me.status_code == 200, me.text
    return Caller(id=UUID(me.json()["id"]), headers=bearer(tokens))


def wallet_worker(runtime: Runtime, **overrides: Any) -> AbstractAsyncContextManager[Worker]:
    """A job worker in this process on the ``wallet`` queue (what ``surge worker`` runs)."""
    return running_worker(runtime, ["wallet"], **overrides)
