"""Wallet API fixtures: the real app (identity, jobs, cache), partners and an MFA admin
signed in through the API, and an in-process job worker on the ``wallet`` queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest
from fastapi import FastAPI

from surge.config import Settings
from surge.identity.service import identity as identity_service
from surge.kit.jobs.worker import Worker, WorkerConfig
from surge.kit.runtime import Runtime
from tests.conftest import app_client
from tests.identity.conftest import (
    PASSWORD,
    bearer,
    identity_settings,
    login,
    make_admin,
    unique_email,
)


@dataclass
class Caller:
    id: UUID
    headers: dict[str, str]


@pytest.fixture(scope="session")
def wallet_settings(server_urls: tuple[str, str]) -> Settings:
    return identity_settings(*server_urls, WALLET_WITHDRAWAL_MIN=100)


@pytest.fixture
async def wallet_app(wallet_settings: Settings) -> FastAPI:
    from surge.app import create_app

    return create_app(wallet_settings)


@pytest.fixture
async def api(wallet_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(wallet_app):
        yield client


def runtime_of(app: FastAPI) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


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


@contextlib.asynccontextmanager
async def wallet_worker(runtime: Runtime, **overrides: Any) -> AsyncIterator[Worker]:
    """A job worker in this process on the ``wallet`` queue (what ``surge worker`` runs)."""
    config = WorkerConfig(
        queues=["wallet"],
        concurrency=4,
        poll_interval=timedelta(milliseconds=50),
        backoff=timedelta(milliseconds=100),
        **overrides,
    )
    worker = Worker(runtime, config)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
