"""The vertical slice: POST an operation → reservation + job → worker logs in through a
proxy, renews, settles. Seed 000's login flow, signal refresh and blocked-proxy checks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
from fastapi import FastAPI

from surge.wallet.funds import funds as funds_service
from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import Caller
from tests.fixtures.provider import control
from tests.operations.conftest import (
    World,
    make_reseller,
    ops_worker,
    submit,
    wait_decided,
)


async def available(app: FastAPI, caller: Caller) -> int:
    runtime = runtime_of(app)
    async with runtime.db.session() as session:
        return await funds_service.available(
            session, caller.id, currency=runtime.settings.WALLET_CURRENCY
        )


class TestRenewal:
    async def test_renewal_succeeds_and_is_paid_once(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
    ) -> None:
        before = await available(ops_app, reseller)
        created = await submit(api, reseller, package="sport", months=2)
        assert created.status_code == 202, created.text
        op = created.json()
        assert op["status"] == "queued"
        assert op["amount"] == 3_600  # retail sport 1 800 × 2
        assert await available(ops_app, reseller) == before - 3_600  # reserved at once
        async with ops_worker(runtime_of(ops_app)):
            done = await wait_decided(api, reseller, op["id"])
        assert done["status"] == "succeeded", done
        assert [a["outcome"] for a in done["attempts"]] == ["performed"]
        state: dict[str, Any] = await control(world.provider.url, "/_control/state")
        assert [p["reference"] for p in state["performed"]] == [op["id"]]
        assert state["performed"][0]["ip"].startswith("127.0.0.")  # through a proxy
        assert state["performed"][0]["ip"] != "127.0.0.1"
        assert await available(ops_app, reseller) == before - 3_600

    async def test_same_idempotency_key_charges_once(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        before = await available(ops_app, reseller)
        first = await submit(api, reseller, key="same-key")
        second = await submit(api, reseller, key="same-key")
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"]
        assert second.headers.get("Idempotent-Replayed") == "true"
        assert await available(ops_app, reseller) == before - 1_800

    async def test_key_is_required(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        before = await available(ops_app, reseller)
        response = await api.post(
            "/api/v1/operations",
            json={"kind": "renew", "card": "1234567890", "package": "sport", "months": 1},
            headers=reseller.headers,
        )
        assert response.status_code == 428
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["header"] == "Idempotency-Key"
        assert await available(ops_app, reseller) == before  # nothing reserved
        listed = await api.get("/api/v1/operations", headers=reseller.headers)
        assert listed.json()["items"] == []

    async def test_bad_input_is_refused_and_nothing_reserved(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        before = await available(ops_app, reseller)
        for body in (
            {"kind": "renew", "card": "12ab", "package": "sport", "months": 1},
            {"kind": "renew", "card": "1234567890", "package": "gold-plus", "months": 1},
            {"kind": "renew", "card": "1234567890", "package": "sport", "months": 0},
            {"kind": "renew", "card": "1234567890", "package": "sport", "months": 13},
        ):
            response = await api.post(
                "/api/v1/operations", json=body,
                headers={**reseller.headers, "Idempotency-Key": str(body)},
            )  # fmt: skip
            assert response.status_code == 422, (body, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
        assert await available(ops_app, reseller) == before

    async def test_insufficient_credit_is_409(
        self, ops_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        poor = await make_reseller(ops_app, api, credit=500)
        response = await submit(api, poor, package="premium", months=1)
        assert response.status_code == 409, response.text

    async def test_own_operations_only(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        mine = (await submit(api, reseller)).json()
        other = await make_reseller(ops_app, api)
        assert (
            await api.get(f"/api/v1/operations/{mine['id']}", headers=other.headers)
        ).status_code == 404
        listed = await api.get("/api/v1/operations", headers=other.headers)
        assert listed.json()["items"] == []
        page = await api.get("/api/v1/operations?limit=1", headers=reseller.headers)
        assert [i["id"] for i in page.json()["items"]] == [mine["id"]]


class TestSignalRefresh:
    async def test_signal_refresh(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
    ) -> None:
        op = (await submit(api, reseller, kind="signal", card="5555666677")).json()
        async with ops_worker(runtime_of(ops_app)):
            done = await wait_decided(api, reseller, op["id"])
        assert done["status"] == "succeeded"
        state = await control(world.provider.url, "/_control/state")
        assert [(p["kind"], p["reference"]) for p in state["performed"]] == [("signal", op["id"])]


class TestSessions:
    async def test_second_operation_reuses_the_provider_session(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
    ) -> None:
        async with ops_worker(runtime_of(ops_app), concurrency=1):
            for _ in range(6):
                op = (await submit(api, reseller)).json()
                assert (await wait_decided(api, reseller, op["id"]))["status"] == "succeeded"
        state = await control(world.provider.url, "/_control/state")
        # 3 accounts × 3 proxies could need 9 logins at most; 6 operations in a row reuse.
        assert state["logins"] < 6


class TestLoad:
    async def test_50_concurrent_requests_reserve_exactly(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        """Seed 000: load test with 50 concurrent requests; each reserves once, exactly."""
        import asyncio

        before = await available(ops_app, reseller)
        responses = await asyncio.gather(
            *(submit(api, reseller, card=f"30000000{i:02d}", package="basic") for i in range(50))
        )
        assert [r.status_code for r in responses] == [202] * 50
        assert len({r.json()["id"] for r in responses}) == 50
        assert await available(ops_app, reseller) == before - 50 * 1_000


class TestSessionExpiry:
    async def test_expired_provider_session_logs_in_again(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
    ) -> None:
        async with ops_worker(runtime_of(ops_app), concurrency=1):
            first = (await submit(api, reseller)).json()
            assert (await wait_decided(api, reseller, first["id"]))["status"] == "succeeded"
            logins = (await control(world.provider.url, "/_control/state"))["logins"]
            # Every session the provider holds idles out (ours is still cached in Redis).
            await control(world.provider.url, "/_control/expire", {})
            second = (await submit(api, reseller)).json()
            done = await wait_decided(api, reseller, second["id"])
        assert done["status"] == "succeeded"
        state = await control(world.provider.url, "/_control/state")
        assert state["logins"] == logins + 1  # the cached session was refused: one new login
        assert [p["reference"] for p in state["performed"]] == [first["id"], second["id"]]


class TestLimiter:
    def test_seed_000_rate_limit_is_the_default(self) -> None:
        from surge.config import Settings
        from surge.kit.jobs.worker import WorkerConfig

        config = WorkerConfig.from_settings(Settings(), queues=["operations"])
        limit = config.rate_limits["operations"]
        assert (limit.limit, limit.period) == (50, timedelta(minutes=1))


class TestCursor:
    async def test_pages_follow_the_cursor_newest_first(
        self, ops_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        caller = await make_reseller(ops_app, api)
        made = [(await submit(api, caller, card=f"40000000{i:02d}")).json()["id"] for i in range(5)]
        seen: list[str] = []
        cursor: str | None = None
        while True:
            query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
            page = (await api.get(f"/api/v1/operations{query}", headers=caller.headers)).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(made))
        forged = await api.get("/api/v1/operations?cursor=not-a-cursor", headers=caller.headers)
        assert forged.status_code == 400
