"""1 000 e-mails from 50 concurrent business transactions through a real worker process,
with the relay restarted mid-run and the worker SIGKILLed once at the worst moment (its
relay had taken messages but not yet said so): every message is delivered exactly once, or
not delivered and suppressed for a recorded reason; a rolled-back transaction sends nothing.

``SURGE_CHAOS_LONG=1`` (``make chaos``) runs 5 000 messages."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import func, select

from surge.kit.runtime import Runtime
from surge.models.notifications import OutboxMessage, Suppression
from surge.notifications.service import message_id_header
from surge.notifications.service import notifications as notifications_service
from surge.sim.smtp import SmtpSimulator
from tests.fixtures.workers import worker_process

pytestmark = pytest.mark.chaos

LONG = bool(os.environ.get("SURGE_CHAOS_LONG"))
TRANSACTIONS = 50
PER_TRANSACTION = 100 if LONG else 20
ROLLED_BACK = 5
CONNECTIONS = 8


def email_worker_process(
    runtime: Runtime, port: int, log: Path
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    return worker_process(
        runtime.settings, log, ["email"], concurrency=16,
        SURGE_LOG_LEVEL="WARNING",
        SURGE_JOBS_LEASE="PT3S",
        SURGE_JOBS_STALLED_CHECK="PT1S",
        SURGE_JOBS_POLL_INTERVAL="PT0.1S",
        SURGE_JOBS_BACKOFF="PT0.2S",
        SURGE_NOTIFY_SMTP_PORT=str(port),
        SURGE_NOTIFY_SMTP_CONNECTIONS=str(CONNECTIONS),
        SURGE_NOTIFY_SMTP_TIMEOUT="PT30S",
        SURGE_NOTIFY_RETRY_SCHEDULE="0.2",
        SURGE_BREAKER_OPEN_DURATION="PT0.5S",
        SURGE_BREAKER_FLEET="false",
    )  # fmt: skip


async def count_status(runtime: Runtime, run: str, *statuses: str) -> int:
    async with runtime.db.session() as session:
        found = await session.scalar(
            select(func.count()).where(
                OutboxMessage.key.like(f"chaos:{run}:%"), OutboxMessage.status.in_(statuses)
            )
        )
        return int(found or 0)


async def until(predicate: object, timeout: float, what: str) -> None:
    """Wait for a condition of the system (not for time): poll it until a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate() if callable(predicate) else predicate
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def produce(runtime: Runtime, run: str, index: int, *, fail: bool = False) -> None:
    """One business transaction that writes PER_TRANSACTION e-mails (and rolls back if
    ``fail``). Every tenth transaction has one recipient the relay does not know."""
    try:
        async with runtime.db.session() as session:
            for j in range(PER_TRANSACTION):
                if j == 0 and index % 5 == 0:
                    to = f"bounce-{index % 10}-{run}@example.com"  # 2 transactions each
                else:
                    to = f"u{index}-{j}-{run}@example.com"
                await notifications_service.send(
                    session, to=to, template="welcome", context={"email": to},
                    category="account", key=f"chaos:{run}:{'rb' if fail else 'ok'}:{index}:{j}",
                )  # fmt: skip
            if fail:
                raise RuntimeError("the business change failed")
    except RuntimeError:
        if not fail:
            raise


class TestExactlyOnceUnderChaos:
    # 50 transactions open at once, each on its own connection.
    @pytest.mark.parametrize(
        "settings_overrides",
        [{"DB_POOL_MAX": TRANSACTIONS + ROLLED_BACK, "DB_POOL_TIMEOUT": "PT60S"}],
    )
    async def test_restart_and_sigkill_deliver_each_message_once_or_suppress_it(
        self, rt: Runtime, relay: SmtpSimulator, tmp_path: Path
    ) -> None:
        run = uuid4().hex[:8]
        total = TRANSACTIONS * PER_TRANSACTION
        log = tmp_path / "worker.log"

        def delivered() -> int:
            return len(relay.messages)

        with email_worker_process(rt, relay.port, log) as first:
            producers = [produce(rt, run, i) for i in range(TRANSACTIONS)]
            producers += [produce(rt, run, 100 + i, fail=True) for i in range(ROLLED_BACK)]
            await asyncio.gather(*producers)

            # 1. The relay restarts while the worker is sending.
            await until(lambda: delivered() >= total * 0.3, 120, "30 % delivered")
            await asyncio.to_thread(relay.stop)
            await asyncio.to_thread(relay.start)

            # 2. The relay keeps what it receives but holds its "250". Once every SMTP
            # connection of the worker waits on a held reply, no message can be between its
            # "sending" mark and the relay; and once the marks in the database are exactly
            # the held messages, the worker is killed: those messages were delivered, and
            # the worker never heard it.
            await until(lambda: delivered() >= total * 0.6, 120, "60 % delivered")
            relay.relay.hold()

            async def quiet() -> bool:
                before = relay.relay.holding
                sending = await count_status(rt, run, "sending")
                return before == relay.relay.holding == sending == CONNECTIONS

            await until(quiet, 60, "every connection to wait on a held reply")
            first.send_signal(signal.SIGKILL)
            first.wait()
            relay.relay.release()

        with email_worker_process(rt, relay.port, log):
            deadline = time.monotonic() + 180
            while await count_status(rt, run, "queued", "sending"):
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.1)

        async with rt.db.session() as session:
            rows = list(
                await session.scalars(
                    select(OutboxMessage).where(OutboxMessage.key.like(f"chaos:{run}:%"))
                )
            )
            suppressed = {
                s.address: s.reason
                for s in await session.scalars(
                    select(Suppression).where(Suppression.address.like(f"%-{run}@example.com"))
                )
            }
        assert len(rows) == total
        assert not [r for r in rows if ":rb:" in r.key]  # rolled back: no row...
        received = Counter(m.message_id for m in relay.messages)
        assert all(count == 1 for count in received.values()), "a message arrived twice"
        by_status = Counter(r.status for r in rows)
        assert set(by_status) <= {"sent", "unconfirmed", "bounced", "held"}, by_status
        assert by_status["unconfirmed"] >= 1  # the SIGKILL left at least one
        for row in rows:
            copies = received[message_id_header(row.id, rt.settings)]
            if row.status in {"sent", "unconfirmed"}:
                assert copies == 1, (row.status, row.to_address, row.last_error, row.attempts)
            else:
                assert copies == 0
                assert suppressed.get(row.to_address) == "hard_bounce", row.to_address
        ours = {message_id_header(r.id, rt.settings) for r in rows}
        assert set(received) <= ours  # ...and no mail
        assert sum(received[m] for m in ours) == by_status["sent"] + by_status["unconfirmed"]
