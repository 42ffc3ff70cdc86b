"""Notification fixtures: a fresh SMTP relay per test, settings pointing at it with short
retry delays, a runtime, and an in-process worker on the ``email`` queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import select, text

from surge.config import Settings
from surge.kit.breaker import breakers
from surge.kit.jobs.worker import Worker
from surge.kit.runtime import Runtime
from surge.models.notifications import NotificationEvent, OutboxMessage
from surge.sim.smtp import SmtpSimulator
from tests.fixtures.factories import identity_settings
from tests.fixtures.smtp import smtp_relay
from tests.fixtures.workers import running_worker

FINAL = {"sent", "unconfirmed", "bounced", "blocked", "failed", "skipped", "held"}


@pytest.fixture
def relay() -> Iterator[SmtpSimulator]:
    with smtp_relay() as sim:
        yield sim


def notify_settings(server_urls: tuple[str, str], port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "NOTIFY_SMTP_PORT": port,
        "NOTIFY_SMTP_TIMEOUT": timedelta(seconds=1),
        "NOTIFY_RETRY_SCHEDULE": [timedelta(milliseconds=100)],
        "BREAKER_FLEET": False,
        **overrides,
    }
    return identity_settings(*server_urls, **values)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def notify_config(
    server_urls: tuple[str, str], relay: SmtpSimulator, settings_overrides: dict[str, Any]
) -> Settings:
    return notify_settings(server_urls, relay.port, **settings_overrides)


@pytest.fixture
async def rt(notify_config: Settings) -> AsyncIterator[Runtime]:
    if "smtp" in breakers:
        breakers.reset("smtp")
    runtime = Runtime(notify_config)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()
        if "smtp" in breakers:
            breakers.reset("smtp")


def email_worker(runtime: Runtime, concurrency: int = 4) -> AbstractAsyncContextManager[Worker]:
    """What ``surge worker --queues email`` runs, in this process."""
    return running_worker(runtime, ["email"], concurrency=concurrency)


async def status_of(runtime: Runtime, message_id: UUID) -> OutboxMessage:
    async with runtime.db.session() as session:
        row = await session.scalar(select(OutboxMessage).where(OutboxMessage.id == message_id))
        assert row is not None
        return row


async def wait_status(
    runtime: Runtime, message_id: UUID, statuses: set[str] = FINAL, timeout: float = 20
) -> OutboxMessage:
    """Wait (on the database's own state, not a sleep) until the message reaches a status."""
    deadline = time.monotonic() + timeout
    while True:
        row = await status_of(runtime, message_id)
        if row.status in statuses:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"message {message_id} still {row.status} ({row.last_error})")
        await asyncio.sleep(0.02)


async def events_of(runtime: Runtime, message_id: UUID) -> list[str]:
    async with runtime.db.session() as session:
        rows = await session.scalars(
            select(NotificationEvent.event)
            .where(NotificationEvent.message_id == message_id)
            .order_by(NotificationEvent.id)
        )
        return list(rows)


async def forget_address(runtime: Runtime, address: str) -> None:
    async with runtime.db.session() as session:
        await session.execute(
            text("DELETE FROM notification_suppressions WHERE address = :a"), {"a": address}
        )
