"""A hostile partner and racing admins against the wallet's money paths, through the real
app: an Idempotency-Key replayed after its HTTP record expired, withdrawals racing past the
balance, approve and reject racing on one withdrawal. After each attack the ledger's
invariants hold (every transfer balances, no wallet below zero, balances = their entries)."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import httpx
from fastapi import FastAPI

from tests.fixtures.factories import Caller
from tests.fixtures.keys import expire_key
from tests.wallet.test_api import assert_invariants, funded_partner, withdraw


async def available(api: httpx.AsyncClient, who: Caller) -> int:
    wallet = (await api.get("/api/v1/wallet", headers=who.headers)).json()
    value: int = wallet["available"]
    return value


class TestKeyReplayedAfterItsTtl:
    async def test_the_same_request_reserves_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """A client (or an attacker replaying a captured request) resends a withdrawal a day
        later with its Idempotency-Key: it names the withdrawal it made, not a second one."""
        partner = await funded_partner(wallet_app, api, amount=10_000)
        key = f"payout-{uuid4()}"
        first = await withdraw(api, partner, 4_000, key)
        assert first.status_code == 201, first.text
        await expire_key(wallet_app, key)
        again = await withdraw(api, partner, 4_000, key)
        assert again.status_code in (200, 201), again.text
        assert again.json()["id"] == first.json()["id"]
        listed = (await api.get("/api/v1/withdrawals", headers=partner.headers)).json()
        assert len(listed["items"]) == 1
        assert await available(api, partner) == 6_000
        await assert_invariants(wallet_app)

    async def test_another_amount_under_the_same_key_is_a_422(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=10_000)
        key = f"payout-{uuid4()}"
        assert (await withdraw(api, partner, 4_000, key)).status_code == 201
        await expire_key(wallet_app, key)
        other = await withdraw(api, partner, 5_000, key)
        assert other.status_code == 422, other.text
        assert other.headers["content-type"] == "application/problem+json"
        assert await available(api, partner) == 6_000
        await assert_invariants(wallet_app)

    async def test_keys_are_per_owner(self, wallet_app: FastAPI, api: httpx.AsyncClient) -> None:
        """Two partners using the same key string each get their own withdrawal."""
        a = await funded_partner(wallet_app, api, amount=10_000)
        b = await funded_partner(wallet_app, api, amount=10_000)
        key = f"payout-{uuid4()}"
        made_a = await withdraw(api, a, 1_000, key)
        made_b = await withdraw(api, b, 2_000, key)
        assert made_a.status_code == made_b.status_code == 201
        assert made_a.json()["id"] != made_b.json()["id"]
        assert (await available(api, a), await available(api, b)) == (9_000, 8_000)


class TestRaces:
    async def test_concurrent_withdrawals_never_exceed_the_balance(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=10_000)
        replies = await asyncio.gather(
            *(withdraw(api, partner, 3_000, f"k-{uuid4()}") for _ in range(12))
        )
        codes = sorted(r.status_code for r in replies)
        assert codes == [201] * 3 + [409] * 9, codes
        assert all(
            r.headers["content-type"] == "application/problem+json"
            for r in replies
            if r.status_code == 409
        )
        assert await available(api, partner) == 1_000
        await assert_invariants(wallet_app)

    async def test_approve_and_reject_racing_decide_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=10_000)
        made = (await withdraw(api, partner, 4_000)).json()
        path = f"/api/admin/withdrawals/{made['id']}"
        replies = await asyncio.gather(
            *(
                api.post(f"{path}/{'approve' if n % 2 else 'reject'}", headers=admin.headers)
                for n in range(8)
            )
        )
        winners = {r.json()["status"] for r in replies if r.status_code == 200}
        assert len(winners) == 1, [r.text for r in replies]
        assert {r.status_code for r in replies} <= {200, 409}
        decided = await api.get(f"/api/v1/withdrawals/{made['id']}", headers=partner.headers)
        wallet = (await api.get("/api/v1/wallet", headers=partner.headers)).json()
        if decided.json()["status"] == "approved":
            assert (wallet["balance"], wallet["available"]) == (6_000, 6_000)
        else:
            assert (wallet["balance"], wallet["available"]) == (10_000, 10_000)
        await assert_invariants(wallet_app)
