"""Payments fixtures: the provider simulator (a real loopback server, one per session), the
app served by a real uvicorn (the simulator POSTs its webhooks to it), an in-process job
worker on the ``payments`` queue, and resellers signed in through the API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from surge.config import Settings
from surge.identity.service import identity as identity_service
from surge.kit.jobs.worker import Worker
from surge.kit.runtime import Runtime
from tests.fixtures.factories import PASSWORD, Caller, bearer, identity_settings, unique_email
from tests.fixtures.payments import (
    OLD_SECRET,
    SIM_SECRET,
    PaymentSim,
    payment_sim_process,
    serve_app,
)
from tests.fixtures.waiting import eventually
from tests.fixtures.workers import running_worker


@dataclass
class Live:
    """The app on a real port, a client to it, its runtime and the simulator."""

    url: str
    api: httpx.AsyncClient
    app: FastAPI
    runtime: Runtime
    sim: PaymentSim

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/api/v1/webhooks/payments"

    async def reseller(self) -> Caller:
        email = unique_email("reseller")
        async with self.runtime.db.session() as session:
            user = await identity_service.register(
                session, self.runtime, email=email, password=PASSWORD, role="reseller"
            )
        response = await self.api.post(
            "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
        )
        assert response.status_code == 200, response.text
        return Caller(id=user.id, headers=bearer(response.json()))

    async def topup(
        self, caller: Caller, amount: int = 2_000, card: str = "pm_card_visa",
        key: str | None = None, **extra: Any,
    ) -> httpx.Response:  # fmt: skip
        return await self.api.post(
            "/api/v1/topups",
            json={"amount": amount, "currency": "USD", "payment_method": card, **extra},
            headers={**caller.headers, "Idempotency-Key": key or uuid.uuid4().hex},
        )

    async def settled(self, timeout: float = 60) -> None:
        """Every webhook delivered and every payments job done."""
        await self.sim.idle(timeout)
        await wait_for(self.runtime, _nothing_pending, timeout)


async def _nothing_pending(runtime: Runtime) -> bool:
    async with runtime.db.session() as session:
        busy = await session.scalar(
            text(
                "SELECT (SELECT count(*) FROM payment_events WHERE state = 'pending') + "
                "(SELECT count(*) FROM jobs WHERE queue = 'payments' AND "
                " state IN ('queued', 'active') AND run_at <= now())"
            )
        )
    return bool(busy == 0)


async def wait_for(runtime: Runtime, check: Any, timeout: float = 30) -> None:
    await eventually(lambda: check(runtime), timeout=timeout, interval=0.05)


def payment_settings(database_url: str, redis_url: str, sim_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "PAYMENTS_PROVIDER_URL": sim_url,
        # The current secret and the one being rotated out: both verify.
        "PAYMENTS_WEBHOOK_SECRETS": f"{SIM_SECRET},{OLD_SECRET}",
        "PAYMENTS_TOPUP_MIN": 500,
        "PAYMENTS_TOPUP_MAX": 1_000_000,
        "PAYMENTS_EVENT_RETRY": timedelta(milliseconds=50),
        "PAYMENTS_EVENT_MAX_ATTEMPTS": 2,
        "DB_POOL_MIN": 1,
    }
    values.update(overrides)
    return identity_settings(database_url, redis_url, **values)


@pytest.fixture(scope="session")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log: Path = tmp_path_factory.mktemp("payment-sim") / "sim.log"
    with payment_sim_process(log) as url:
        yield url


@pytest.fixture
async def sim(sim_url: str) -> AsyncIterator[PaymentSim]:
    handle = PaymentSim(sim_url)
    try:
        yield handle
    finally:
        await handle.aclose()


@pytest.fixture
def pay_settings(server_urls: tuple[str, str], sim_url: str) -> Settings:
    return payment_settings(*server_urls, sim_url)


@pytest.fixture
async def pay_app(pay_settings: Settings) -> FastAPI:
    from surge.app import create_app

    return create_app(pay_settings)


def payments_worker(runtime: Runtime) -> AbstractAsyncContextManager[Worker]:
    """A job worker in this process on the ``payments`` queue (what ``surge worker`` runs)."""
    return running_worker(
        runtime, ["payments"],
        poll_interval=timedelta(milliseconds=20), backoff=timedelta(milliseconds=50),
    )  # fmt: skip


@pytest.fixture
async def live(pay_app: FastAPI, sim: PaymentSim) -> AsyncIterator[Live]:
    async with serve_app(pay_app) as url:
        runtime: Runtime = pay_app.state.runtime
        handle = Live(url, httpx.AsyncClient(base_url=url, timeout=30), pay_app, runtime, sim)
        await sim.reset(handle.webhook_url)
        try:
            async with payments_worker(runtime):
                yield handle
                await sim.idle()
        finally:
            await handle.api.aclose()
