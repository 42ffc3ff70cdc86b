"""An administrator's solo budget (ADR 0066): money actions each within the four-eyes
threshold still stop being one person's word once they add up past
``APPROVAL_SOLO_BUDGET`` in the window; the rest waits for a second administrator. Each test
failed against main, where one administrator could pay out any number of payouts just under
the threshold alone."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

import httpx
import pytest
from fastapi import FastAPI

from surge.config import Settings
from tests.fixtures.factories import Caller, identity_settings
from tests.wallet.test_api import assert_invariants, funded_partner, withdraw
from tests.wallet.test_four_eyes import _decide, _scalar, _status

BUDGET = 20_000
PAYOUT = 8_000  # two fit in the budget, the third does not


@pytest.fixture
def app_settings(server_urls: tuple[str, str]) -> Settings:
    return identity_settings(*server_urls, WALLET_WITHDRAWAL_MIN=100, APPROVAL_SOLO_BUDGET=BUDGET)


async def _approve(api: httpx.AsyncClient, who: Caller, withdrawal_id: str) -> httpx.Response:
    return await api.post(f"/api/admin/withdrawals/{withdrawal_id}/approve", headers=who.headers)


async def _pending(app: FastAPI, api: httpx.AsyncClient, n: int) -> list[str]:
    partner = await funded_partner(app, api, amount=1_000_000)
    return [(await withdraw(api, partner, PAYOUT)).json()["id"] for _ in range(n)]


async def _spent(app: FastAPI, who: Caller) -> Any:
    return await _scalar(
        app, "SELECT coalesce(sum(amount), 0) FROM admin_solo_actions WHERE maker_id = :m",
        m=who.id,
    )  # fmt: skip


async def test_payouts_alone_stop_at_the_budget_and_the_next_waits_for_a_second_administrator(
    wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
) -> None:
    first, second, third, fourth = await _pending(wallet_app, api, 4)
    assert (await _approve(api, admin, first)).status_code == 200
    assert (await _approve(api, admin, second)).status_code == 200
    asked = await _approve(api, admin, third)
    assert asked.status_code == 202, asked.text
    assert asked.headers["content-type"] == "application/problem+json"
    assert asked.json()["solo_budget"] == {
        "budget": BUDGET, "spent": 2 * PAYOUT, "currency": "USD", "window_seconds": 86_400,
    }  # fmt: skip
    assert await _status(wallet_app, third) == "pending"  # nothing paid out
    assert await _spent(wallet_app, admin) == 2 * PAYOUT  # the refused one is not counted

    done = await _decide(api, second_admin, asked.json()["approval"]["id"])
    assert done.status_code == 200, done.text
    assert await _status(wallet_app, third) == "approved"
    assert await _spent(wallet_app, second_admin) == 0  # an approval is not a solo action
    # Each administrator has a budget of their own.
    assert (await _approve(api, second_admin, fourth)).status_code == 200
    assert await _spent(wallet_app, second_admin) == PAYOUT
    await assert_invariants(wallet_app)


async def test_an_action_retried_is_counted_once(
    wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
) -> None:
    first, second = await _pending(wallet_app, api, 2)
    for _ in range(3):
        assert (await _approve(api, admin, first)).status_code == 200
    assert await _spent(wallet_app, admin) == PAYOUT
    assert (await _approve(api, admin, second)).status_code == 200  # still room for it


async def test_concurrent_approvals_alone_cannot_overrun_the_budget(
    wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
) -> None:
    ids = await _pending(wallet_app, api, 5)
    replies = await asyncio.gather(*(_approve(api, admin, i) for i in ids))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 202, 202, 202], [r.text for r in replies]
    assert await _spent(wallet_app, admin) == 2 * PAYOUT
    statuses = [await _status(wallet_app, i) for i in ids]
    assert statuses.count("approved") == 2
    await assert_invariants(wallet_app)


async def test_the_window_rolls(wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller) -> None:
    first, second, third = await _pending(wallet_app, api, 3)
    assert (await _approve(api, admin, first)).status_code == 200
    assert (await _approve(api, admin, second)).status_code == 200
    await _scalar(
        wallet_app,
        "UPDATE admin_solo_actions SET at = at - interval '25 hours' WHERE maker_id = :m "
        "RETURNING 1",
        m=admin.id,
    )  # a day later
    assert (await _approve(api, admin, third)).status_code == 200


async def test_small_revenue_events_from_a_person_count_too(
    wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
) -> None:
    events = [{"id": f"game-{uuid4()}", "kind": "game", "profit": PAYOUT} for _ in range(3)]
    for event in events[:2]:
        done = await api.post("/api/v1/revenue-events", json=event, headers=admin.headers)
        assert done.status_code == 201, done.text
    replay = await api.post("/api/v1/revenue-events", json=events[0], headers=admin.headers)
    assert replay.status_code == 200  # a replay answers as before and spends nothing
    asked = await api.post("/api/v1/revenue-events", json=events[2], headers=admin.headers)
    assert asked.status_code == 202, asked.text
    recorded = "SELECT count(*) FROM wallet_revenue_events WHERE id = :i"
    assert await _scalar(wallet_app, recorded, i=events[2]["id"]) == 0
