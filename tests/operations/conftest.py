"""Operations fixtures: the provider simulator and proxies on loopback, the real app, a
reseller with credit, and an in-process worker on the ``operations`` queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import uuid4

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from surge.config import Settings
from surge.identity.service import identity as identity_service
from surge.kit.jobs.worker import Worker
from surge.kit.runtime import Runtime
from surge.operations.service import operations as operations_service
from surge.sim.provider import ProviderServer
from surge.sim.proxies import ForwardProxy
from surge.wallet.funds import funds as funds_service
from tests.fixtures.clients import app_client, runtime_of
from tests.fixtures.factories import (
    PASSWORD,
    Caller,
    bearer,
    identity_settings,
    login,
    make_admin,
    unique_email,
)
from tests.fixtures.provider import ACCOUNTS, egress_proxies, provider_server
from tests.fixtures.workers import running_worker


@dataclass
class World:
    provider: ProviderServer
    proxies: list[ForwardProxy]
    settings: Settings


def ops_settings(
    database_url: str, redis_url: str, provider_url: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "OPERATIONS_PROVIDER_URL": provider_url,
        "OPERATIONS_PROXY_BACKOFF": timedelta(seconds=2),
        "OPERATIONS_PROXY_BACKOFF_MAX": timedelta(seconds=4),
        "OPERATIONS_TIMEOUT": timedelta(seconds=5),
        "OPERATIONS_ACCOUNT_LEASE": timedelta(seconds=30),
    }
    return identity_settings(database_url, redis_url, **{**values, **overrides})


async def reset(runtime: Runtime) -> None:
    """Tests of this package share one database: start each from an empty fleet."""
    async with runtime.db.session() as session:
        await session.execute(text("DELETE FROM operations_provider_accounts"))
        await session.execute(text("DELETE FROM operations_proxies"))
        await session.execute(
            text("DELETE FROM jobs WHERE queue = 'operations' AND state IN ('queued', 'active')")
        )
    async with runtime.redis.guard() as redis:
        keys = [k async for k in redis.scan_iter("operations:*")]
        if keys:
            await redis.delete(*keys)


async def register_fleet(
    runtime: Runtime, proxies: list[ForwardProxy], accounts: dict[str, str] | None = None
) -> None:
    async with runtime.db.session() as session:
        for username, password in (accounts or ACCOUNTS).items():
            await operations_service.add_account(
                session, runtime, username=username, password=password
            )
        for proxy in proxies:
            await operations_service.add_proxy(session, runtime, url=proxy.url)


@pytest.fixture
def ops_overrides() -> dict[str, Any]:
    """Settings a test changes: ``@pytest.mark.parametrize("ops_overrides", [{...}])``."""
    return {}


@pytest.fixture
async def world(
    server_urls: tuple[str, str], ops_overrides: dict[str, Any]
) -> AsyncIterator[World]:
    async with provider_server() as provider, egress_proxies(3) as proxies:
        yield World(provider, proxies, ops_settings(*server_urls, provider.url, **ops_overrides))


@pytest.fixture
async def ops_app(world: World) -> FastAPI:
    from surge.app import create_app

    return create_app(world.settings)


@pytest.fixture
async def api(ops_app: FastAPI, world: World) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(ops_app):
        runtime = runtime_of(ops_app)
        await reset(runtime)
        await register_fleet(runtime, world.proxies)
        yield client


async def make_reseller(
    app: FastAPI, api: httpx.AsyncClient, *, credit: int = 100_000, tier: str | None = None
) -> Caller:
    email = unique_email("reseller")
    runtime = runtime_of(app)
    async with runtime.db.session() as session:
        user = await identity_service.register(
            session, runtime, email=email, password=PASSWORD, role="reseller"
        )
        if credit:
            await funds_service.credit(
                session, user.id, amount=credit, currency=runtime.settings.WALLET_CURRENCY,
                key=f"test-credit:{user.id}", kind="topup",
            )  # fmt: skip
        if tier:
            await operations_service.set_tier(session, user.id, tier=tier)
    tokens = await login(api, email)
    return Caller(id=user.id, headers=bearer(tokens))


@pytest.fixture
async def reseller(ops_app: FastAPI, api: httpx.AsyncClient) -> Caller:
    return await make_reseller(ops_app, api)


@pytest.fixture
async def admin(ops_app: FastAPI, api: httpx.AsyncClient) -> Caller:
    _, tokens, _ = await make_admin(ops_app, api)
    return Caller(id=uuid4(), headers=bearer(tokens))


def ops_worker(runtime: Runtime, **overrides: Any) -> AbstractAsyncContextManager[Worker]:
    """A job worker in this process on the ``operations`` queue (what ``surge worker`` runs)."""
    return running_worker(
        runtime, ["operations"], stop_timeout=30, **{"concurrency": 8, **overrides}
    )


async def submit(
    api: httpx.AsyncClient, caller: Caller, *, card: str = "1234567890", package: str = "sport",
    months: int = 1, kind: str = "renew", key: str | None = None,
) -> httpx.Response:  # fmt: skip
    body: dict[str, Any] = {"kind": kind, "card": card}
    if kind == "renew":
        body |= {"package": package, "months": months}
    headers = {**caller.headers, "Idempotency-Key": key or str(uuid4())}
    return await api.post("/api/v1/operations", json=body, headers=headers)


async def wait_decided(
    api: httpx.AsyncClient, caller: Caller, operation_id: str, *, timeout: float = 30
) -> dict[str, Any]:
    """Poll the API (as the panel does) until the operation is decided."""
    async with asyncio.timeout(timeout):
        while True:
            response = await api.get(f"/api/v1/operations/{operation_id}", headers=caller.headers)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] in ("succeeded", "failed", "needs_review"):
                return body
            await asyncio.sleep(0.05)
