"""Top-ups through the simulator: each test card's path, the one-posting rule, idempotency,
bounds and ownership, refunds and disputes, reconciliation of a lost webhook."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import text

from surge.payments.service import topup as topup_service
from surge.wallet.funds import funds as funds_service
from tests.fixtures.factories import Caller
from tests.payments.conftest import Live

T = TypeVar("T")


async def postings(live: Live, payment_id: str) -> list[dict[str, Any]]:
    """Every ledger transfer keyed by this provider payment."""
    async with live.runtime.db.session() as session:
        rows = await session.execute(
            text(
                "SELECT idempotency_key, amount, kind FROM wallet_transfers "
                "WHERE idempotency_key = :k OR idempotency_key LIKE :p ORDER BY id"
            ),
            {"k": f"payment:{payment_id}", "p": f"payment:{payment_id}:%"},
        )
        return [dict(row._mapping) for row in rows]


async def _later(coro: Awaitable[T], delay: float) -> T:
    await asyncio.sleep(delay)
    return await coro


async def balance(live: Live, caller: Caller) -> int:
    response = await live.api.get("/api/v1/wallet", headers=caller.headers)
    assert response.status_code == 200, response.text
    value: int = response.json()["balance"]
    return value


class TestCards:
    async def test_success_is_credited_once_by_request_and_webhook(self, live: Live) -> None:
        caller = await live.reseller()
        response = await live.topup(caller, amount=2_500)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["status"] == "succeeded"
        assert body["amount_credited"] == 2_500
        await live.settled()
        assert await balance(live, caller) == 2_500
        assert [p["amount"] for p in await postings(live, body["provider_payment_id"])] == [2_500]

    async def test_decline_is_recorded_and_never_credited(self, live: Live) -> None:
        caller = await live.reseller()
        response = await live.topup(caller, card="pm_card_chargeDeclined")
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["status"], body["failure_code"]) == ("failed", "card_declined")
        await live.settled()
        assert await balance(live, caller) == 0
        assert await postings(live, body["provider_payment_id"]) == []

    async def test_second_step_then_credited_by_webhook(self, live: Live) -> None:
        caller = await live.reseller()
        response = await live.topup(caller, amount=1_000, card="pm_card_authenticationRequired")
        body = response.json()
        assert body["status"] == "requires_action"
        assert body["next_action_url"].startswith(live.sim.url)
        await live.sim.authenticate(body["next_action_url"])
        await live.settled()
        after = await live.api.get(f"/api/v1/topups/{body['id']}", headers=caller.headers)
        assert after.json()["status"] == "succeeded"
        assert await balance(live, caller) == 1_000

    async def test_slow_payment_processing_then_succeeded(self, live: Live) -> None:
        caller = await live.reseller()
        response = await live.topup(caller, amount=700, card="pm_card_slow")
        assert response.json()["status"] == "processing"
        assert await balance(live, caller) == 0
        await live.settled()
        assert await balance(live, caller) == 700


class TestIdempotency:
    async def test_same_key_replays_the_first_answer(self, live: Live) -> None:
        caller = await live.reseller()
        first = await live.topup(caller, amount=900, key="k-1")
        again = await live.topup(caller, amount=900, key="k-1")
        assert again.status_code == 201
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json()["id"] == first.json()["id"]
        await live.settled()
        assert await balance(live, caller) == 900

    async def test_same_key_other_amount_is_422(self, live: Live) -> None:
        caller = await live.reseller()
        await live.topup(caller, amount=900, key="k-2")
        other = await live.topup(caller, amount=901, key="k-2")
        assert other.status_code == 422
        assert other.headers["content-type"].startswith("application/problem+json")

    async def test_concurrent_duplicate_gets_409_while_in_flight(self, live: Live) -> None:
        caller = await live.reseller()
        await live.sim.control(latency=0.5)  # the first request holds its key this long
        first, second = await asyncio.gather(
            live.topup(caller, amount=1_100, key="k-3"),
            _later(live.topup(caller, amount=1_100, key="k-3"), 0.2),
        )
        await live.sim.control(latency=0)
        assert first.status_code == 201, first.text
        assert second.status_code == 409, second.text
        assert second.headers["Retry-After"] == "1"
        replay = await live.topup(caller, amount=1_100, key="k-3")
        assert replay.json()["id"] == first.json()["id"]
        await live.settled()
        assert await balance(live, caller) == 1_100

    async def test_key_reused_after_its_http_record_expired_charges_nothing(
        self, live: Live
    ) -> None:
        caller = await live.reseller()
        first = (await live.topup(caller, amount=1_300, key="k-4")).json()
        async with live.runtime.db.session() as session:  # 24 h later: the record is purged
            await session.execute(
                text("DELETE FROM idempotency_keys WHERE scope = :s AND key = 'k-4'"),
                {"s": f"topup:{caller.id}"},
            )
            await session.commit()
        created = (await live.sim.state())["counters"]["created"]
        again = await live.topup(caller, amount=1_300, key="k-4")
        assert again.status_code == 201
        assert again.json()["id"] == first["id"]
        other = await live.topup(caller, amount=1_400, key="k-4")
        assert other.status_code == 422
        assert (await live.sim.state())["counters"]["created"] == created  # no new charge
        await live.settled()
        assert await balance(live, caller) == 1_300

    async def test_key_is_required(self, live: Live) -> None:
        caller = await live.reseller()
        created = (await live.sim.state())["counters"].get("created", 0)
        response = await live.api.post(
            "/api/v1/topups",
            json={"amount": 900, "payment_method": "pm_card_visa"},
            headers=caller.headers,
        )
        assert response.status_code == 428
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["header"] == "Idempotency-Key"
        assert (await live.sim.state())["counters"].get("created", 0) == created  # no charge
        listed = await live.api.get("/api/v1/topups", headers=caller.headers)
        assert listed.json()["items"] == []


class TestValidation:
    async def test_bounds_and_currency(self, live: Live) -> None:
        caller = await live.reseller()
        before = (await live.sim.state())["counters"].get("created", 0)
        for payload in (
            {"amount": 499},
            {"amount": 1_000_001},
            {"amount": 10.5},
            {"amount": "1000"},
            {"amount": 1_000, "currency": "EUR"},
            {"amount": 1_000, "payment_method": "4242 4242"},
        ):
            body = {"currency": "USD", "payment_method": "pm_card_visa", **payload}
            response = await live.api.post(
                "/api/v1/topups", json=body, headers={**caller.headers, "Idempotency-Key": "v"}
            )
            assert response.status_code == 422, (payload, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
        assert (await live.sim.state())["counters"].get("created", 0) == before

    async def test_only_resellers_and_partners(self, live: Live) -> None:
        response = await live.api.post(
            "/api/v1/topups", json={"amount": 1_000, "payment_method": "pm_card_visa"},
            headers={"Idempotency-Key": "anon"},
        )  # fmt: skip
        assert response.status_code == 401


class TestOwnership:
    async def test_get_and_list_own_only(self, live: Live) -> None:
        alice, bob = await live.reseller(), await live.reseller()
        mine = [(await live.topup(alice, amount=600 + i)).json()["id"] for i in range(3)]
        first = await live.api.get("/api/v1/topups?limit=2", headers=alice.headers)
        page = first.json()
        assert [t["id"] for t in page["items"]] == mine[::-1][:2]
        rest = await live.api.get(
            f"/api/v1/topups?limit=2&cursor={page['next_cursor']}", headers=alice.headers
        )
        assert [t["id"] for t in rest.json()["items"]] == [mine[0]]
        assert rest.json()["next_cursor"] is None
        assert (
            await live.api.get(f"/api/v1/topups/{mine[0]}", headers=bob.headers)
        ).status_code == 404
        assert (await live.api.get("/api/v1/topups", headers=bob.headers)).json()["items"] == []
        bad = await live.api.get("/api/v1/topups?cursor=bm9wZQ", headers=alice.headers)
        assert bad.status_code == 400


class TestReversals:
    async def test_refund_and_dispute_post_the_reverse_once(self, live: Live) -> None:
        caller = await live.reseller()
        refunded = (await live.topup(caller, amount=3_000)).json()
        disputed = (await live.topup(caller, amount=2_000)).json()
        await live.sim.control(duplicate=1.0)  # every event twice
        await live.sim.refund(refunded["provider_payment_id"], amount=1_000)
        await live.sim.refund(refunded["provider_payment_id"])
        await live.sim.dispute(disputed["provider_payment_id"])
        await live.settled()
        assert await balance(live, caller) == 0
        kinds = [p["kind"] for p in await postings(live, refunded["provider_payment_id"])]
        assert kinds == ["topup", "topup_refund", "topup_refund"]
        kinds = [p["kind"] for p in await postings(live, disputed["provider_payment_id"])]
        assert kinds == ["topup", "topup_dispute"]
        got = await live.api.get(f"/api/v1/topups/{refunded['id']}", headers=caller.headers)
        assert (got.json()["status"], got.json()["amount_reversed"]) == ("refunded", 3_000)

    async def test_refund_of_money_already_spent_posts_and_is_owed(self, live: Live) -> None:
        """The reversal posts in full (ADR 0042): what the wallet cannot cover is owed, the
        event is processed, not dead-lettered (tests/payments/test_debt.py attacks it)."""
        caller = await live.reseller()
        body = (await live.topup(caller, amount=2_000)).json()
        async with live.runtime.db.session() as session:  # spent on an operation
            await funds_service.reserve(
                session, caller.id, amount=1_500, currency="USD", key=f"op:{uuid.uuid4()}",
                kind="operation",
            )  # fmt: skip
            await session.commit()
        await live.sim.refund(body["provider_payment_id"])
        await live.settled()
        async with live.runtime.db.session() as session:
            state = await session.scalar(
                text(
                    "SELECT state FROM payment_events "
                    "WHERE payment_id = :p AND type = 'charge.refunded'"
                ),
                {"p": body["provider_payment_id"]},
            )
        assert state == "processed"
        wallet = (await live.api.get("/api/v1/wallet", headers=caller.headers)).json()
        assert (wallet["balance"], wallet["available"], wallet["debt"]) == (1_500, 0, 1_500)


class TestReconciliation:
    async def test_lost_webhook_is_settled_by_the_poll(self, live: Live) -> None:
        caller = await live.reseller()
        await live.sim.control(drop=1.0)  # the provider's webhooks never arrive
        body = (await live.topup(caller, amount=800, card="pm_card_slow")).json()
        await live.settled()
        assert await balance(live, caller) == 0  # nothing told Surge it succeeded
        runtime = live.runtime
        settings = runtime.settings.model_copy(update={"PAYMENTS_RECONCILE_AFTER": timedelta(0)})
        object.__setattr__(runtime, "settings", settings)
        async with runtime.db.session() as session:
            assert await topup_service.enqueue_reconciliation(session, runtime) >= 1
            await session.commit()
        await live.settled()
        assert await balance(live, caller) == 800
        got = await live.api.get(f"/api/v1/topups/{body['id']}", headers=caller.headers)
        assert got.json()["status"] == "succeeded"
        assert len(await postings(live, body["provider_payment_id"])) == 1

    async def test_scan_settles_a_payment_whose_request_died_before_commit(
        self, live: Live
    ) -> None:
        """The provider charged, Surge's request died before its commit, the client never
        retried and every webhook was lost: the provider scan still credits it, once."""
        caller = await live.reseller()
        await live.sim.control(drop=1.0)
        topup_id = uuid.uuid4()
        created = await live.sim.http.post(
            "/v1/payment_intents",
            json={"amount": 4_200, "currency": "usd", "payment_method": "pm_card_visa",
                  "confirm": True,
                  "metadata": {"topup_id": str(topup_id), "owner_id": str(caller.id)}},
            headers={"Authorization": "Bearer sk_test_x"},
        )  # fmt: skip
        payment_id = created.json()["id"]
        await live.settled()
        assert await balance(live, caller) == 0
        runtime = live.runtime
        settings = runtime.settings.model_copy(update={"PAYMENTS_RECONCILE_AFTER": timedelta(0)})
        object.__setattr__(runtime, "settings", settings)
        applied = []
        for _ in range(2):  # the second scan finds nothing left to do
            async with runtime.db.session() as session:
                applied.append(await topup_service.scan_provider(session, runtime))
                await session.commit()
        assert applied[0] >= 1  # ours (other tests' open payments may be settled too)
        assert applied[1] == 0
        assert await balance(live, caller) == 4_200
        got = await live.api.get(f"/api/v1/topups/{topup_id}", headers=caller.headers)
        assert got.json()["status"] == "succeeded"
        assert len(await postings(live, payment_id)) == 1
