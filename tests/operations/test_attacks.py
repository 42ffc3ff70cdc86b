"""A hostile reseller against operations' money path, through the real app: a purchase
replayed after its Idempotency-Key's HTTP record expired, another purchase under a used key,
and numbers that are not integers. Nothing is reserved twice; the ledger's invariants hold."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import httpx
import pytest
from fastapi import FastAPI

from surge.wallet.ledger import ledger
from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import Caller
from tests.fixtures.keys import expire_key
from tests.operations.conftest import submit
from tests.operations.test_flow import available


async def assert_invariants(app: FastAPI) -> None:
    async with runtime_of(app).db.session() as session:
        assert await ledger.check_invariants(session) == []


class TestKeyReplayedAfterItsTtl:
    async def test_the_same_purchase_is_reserved_once(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        before = await available(ops_app, reseller)
        key = f"buy-{uuid4()}"
        first = await submit(api, reseller, key=key)
        assert first.status_code == 202, first.text
        await expire_key(ops_app, key)
        again = await submit(api, reseller, key=key)
        assert again.status_code == 202, again.text
        assert again.json()["id"] == first.json()["id"]
        assert await available(ops_app, reseller) == before - 1_800
        listed = (await api.get("/api/v1/operations", headers=reseller.headers)).json()
        assert [item["id"] for item in listed["items"]] == [first.json()["id"]]
        await assert_invariants(ops_app)

    async def test_another_purchase_under_the_key_is_a_422(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        before = await available(ops_app, reseller)
        key = f"buy-{uuid4()}"
        assert (await submit(api, reseller, key=key)).status_code == 202
        await expire_key(ops_app, key)
        other = await submit(api, reseller, key=key, months=3)
        assert other.status_code == 422, other.text
        assert other.headers["content-type"].startswith("application/problem+json")
        assert await available(ops_app, reseller) == before - 1_800
        await assert_invariants(ops_app)


class TestNumbers:
    @pytest.mark.parametrize("months", ["2", 2.0, True, "1e0", 1.5, -1, 2**64])
    async def test_months_is_a_strict_integer(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, months: Any
    ) -> None:
        """``true`` or ``"2"`` silently bought 1 or 2 months: only a JSON integer is one."""
        before = await available(ops_app, reseller)
        response = await api.post(
            "/api/v1/operations",
            json={"kind": "renew", "card": "1234567890", "package": "sport", "months": months},
            headers={**reseller.headers, "Idempotency-Key": str(uuid4())},
        )
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert await available(ops_app, reseller) == before
