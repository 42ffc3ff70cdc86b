"""500 top-ups against a real ``surge serve`` process while the provider duplicates 20 %,
reorders 20 % and drops 10 % of its webhooks, and the web process is SIGKILLed once
mid-run: every successful payment is credited exactly once, no declined one ever, and the
provider's books equal the ledger's.

Clients behave as real ones: a request that got no answer is retried with the same
``Idempotency-Key``. Lost webhooks are made up by the reconciliation poll, as in production.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from surge.kit.embedded import free_port
from surge.payments.service import topup as topup_service
from tests.fixtures.factories import Caller
from tests.fixtures.payments import SIM_SECRET
from tests.fixtures.servers import serve_env, surge_process
from tests.payments.conftest import Live

TOPUPS = 2_000 if os.environ.get("SURGE_CHAOS_LONG") else 500
CLIENTS = 16
KILL_AFTER = TOPUPS * 2 // 5
CARDS = (
    ["pm_card_visa"] * 14
    + ["pm_card_chargeDeclined"] * 3
    + ["pm_card_slow"] * 2
    + ["pm_card_authenticationRequired"]
)


def api_process(live: Live, port: int, log: Path) -> Any:
    settings = live.runtime.settings
    env = serve_env(
        settings.DATABASE_URL,
        settings.REDIS_URL,
        SURGE_PAYMENTS_PROVIDER_URL=settings.PAYMENTS_PROVIDER_URL,
        SURGE_PAYMENTS_WEBHOOK_SECRETS=SIM_SECRET,
        SURGE_DB_POOL_MIN="1",
        SURGE_LOG_LEVEL="WARNING",
    )
    return surge_process(
        ["serve", "--workers", "1", "--port", str(port), "--host", "127.0.0.1", "--no-servers"],
        env,
        ready_url=f"http://127.0.0.1:{port}/livez",
        log_path=log,
    )


@pytest.mark.chaos
async def test_500_topups_duplicated_reordered_dropped_and_a_sigkill(
    live: Live, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sim = live.sim
    before = await sim.state()
    callers = [await live.reseller() for _ in range(10)]
    rng = random.Random(14)
    plan = [(callers[i % len(callers)], rng.choice(CARDS), rng.randint(500, 50_000), uuid.uuid4().hex)
            for i in range(TOPUPS)]  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    done = asyncio.Event()
    back = asyncio.Event()
    back.set()

    async def client(
        http: httpx.AsyncClient, queue: asyncio.Queue[tuple[Caller, str, int, str]]
    ) -> None:
        while not queue.empty():
            caller, card, amount, key = queue.get_nowait()
            while True:
                await back.wait()
                try:
                    response = await http.post(
                        "/api/v1/topups",
                        json={"amount": amount, "currency": "USD", "payment_method": card},
                        headers={**caller.headers, "Idempotency-Key": key},
                    )
                except httpx.TransportError:
                    await asyncio.sleep(0.05)  # the server is gone: retry the same key
                    continue
                if response.status_code >= 500:
                    await asyncio.sleep(0.05)
                    continue
                assert response.status_code == 201, response.text
                results[key] = response.json()
                break
            if len(results) >= KILL_AFTER:
                done.set()

    with ExitStack() as stack:
        proc = stack.enter_context(api_process(live, port, tmp_path / "api-1.log"))
        await sim.control(webhook_url=f"{url}/api/v1/webhooks/payments", duplicate=0.2,
                          reorder=0.2, drop=0.1, latency=0, seed=14)  # fmt: skip
        queue: asyncio.Queue[tuple[Caller, str, int, str]] = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            tasks = [asyncio.create_task(client(http, queue)) for _ in range(CLIENTS)]
            await done.wait()
            back.clear()
            os.killpg(proc.pid, signal.SIGKILL)  # mid-run: requests and webhooks in flight
            proc.wait()
            stack.enter_context(api_process(live, port, tmp_path / "api-2.log"))
            back.set()
            await asyncio.gather(*tasks)
            # The second step of 3-D Secure payments, done by their payers.
            for body in list(results.values()):
                if body["status"] == "requires_action":
                    await sim.authenticate(body["next_action_url"])
            await sim.idle(120)
            await _reconcile(live)
            await live.settled(120)

    assert len(results) == TOPUPS
    after = await sim.state()
    ids = [body["provider_payment_id"] for body in results.values()]
    intents = await _provider_intents(sim, ids)
    async with live.runtime.db.session() as session:
        rows = await session.execute(
            text(
                "SELECT idempotency_key, amount, kind FROM wallet_transfers "
                "WHERE idempotency_key = ANY(:keys)"
            ),
            {"keys": [f"payment:{pi}" for pi in ids]},
        )
        posted = {row.idempotency_key.removeprefix("payment:"): row.amount for row in rows}
        topups = {
            row.provider_payment_id: row.status
            for row in await session.execute(
                text("SELECT provider_payment_id, status FROM payment_topups "
                     "WHERE provider_payment_id = ANY(:ids)"),
                {"ids": ids},
            )
        }  # fmt: skip
    succeeded = {pi for pi, intent in intents.items() if intent["status"] == "succeeded"}
    assert succeeded, "the run must contain successful payments"
    assert set(posted) == succeeded  # every success credited, no decline ever
    assert all(posted[pi] == intents[pi]["amount_received"] for pi in succeeded)
    assert all(topups[pi] == "succeeded" for pi in succeeded)
    assert all(topups[pi] == "failed" for pi in set(ids) - succeeded)
    captured = after["captured"].get("usd", 0) - before["captured"].get("usd", 0)
    assert captured == sum(posted.values())  # the provider's books equal the ledger's
    balances = Counter[uuid.UUID]()
    for caller, _, _, key in plan:
        body = results[key]
        if body["provider_payment_id"] in succeeded:
            balances[caller.id] += intents[body["provider_payment_id"]]["amount_received"]
    for caller in callers:
        wallet = await live.api.get("/api/v1/wallet", headers=caller.headers)
        assert wallet.json()["balance"] == balances[caller.id]
    counters = after["counters"]
    for fault in ("duplicated", "reordered", "dropped"):
        assert counters.get(fault, 0) > before["counters"].get(fault, 0), fault


async def _reconcile(live: Live) -> None:
    """What the minute cron does, now: poll every top-up still open."""
    runtime = live.runtime
    settings = runtime.settings.model_copy(
        update={"PAYMENTS_RECONCILE_AFTER": timedelta(0), "PAYMENTS_RECONCILE_BATCH": 10_000}
    )
    object.__setattr__(runtime, "settings", settings)
    async with runtime.db.session() as session:
        await topup_service.enqueue_reconciliation(session, runtime)
        await session.commit()


async def _provider_intents(sim: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
    intents: dict[str, dict[str, Any]] = {}
    for pi in ids:
        response = await sim.http.get(
            f"/v1/payment_intents/{pi}", headers={"Authorization": "Bearer sk_test_x"}
        )
        intents[pi] = response.json()
    return intents
