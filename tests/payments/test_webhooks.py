"""The webhook endpoint: signature over the raw body, tolerance, rotation, replay refusal,
the inbox and its dead-letter view — never a posting from a refused request."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from structlog.testing import capture_logs

from surge.kit.runtime import Runtime
from surge.kit.security import webhooks
from tests.fixtures.clients import app_client
from tests.fixtures.factories import bearer, make_admin
from tests.fixtures.payments import OLD_SECRET, SIM_SECRET
from tests.payments.conftest import Live, payment_settings, wait_for


def intent_event(owner_id: uuid.UUID, amount: int = 1_200, **changes: Any) -> dict[str, Any]:
    """A ``payment_intent.succeeded`` event as the provider would send it."""
    payment_id = f"pi_forged_{uuid.uuid4().hex[:10]}"
    obj = {
        "id": payment_id, "object": "payment_intent", "amount": amount,
        "amount_received": amount, "currency": "usd", "status": "succeeded",
        "metadata": {"topup_id": str(uuid.uuid4()), "owner_id": str(owner_id)},
    }  # fmt: skip
    return {
        "id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "payment_intent.succeeded",
        "created": int(time.time()), "data": {"object": obj}, **changes,
    }  # fmt: skip


async def post(
    live: Live, event: dict[str, Any], *, secrets: list[str], at: int | None = None,
    body: bytes | None = None,
) -> Any:  # fmt: skip
    raw = json.dumps(event).encode() if body is None else body
    signature = webhooks.header(secrets, raw, at if at is not None else int(time.time()))
    return await live.api.post(
        "/api/v1/webhooks/payments", content=raw,
        headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
    )  # fmt: skip


async def ledger_count(live: Live, payment_id: str) -> int:
    async with live.runtime.db.session() as session:
        count = await session.scalar(
            text("SELECT count(*) FROM wallet_transfers WHERE idempotency_key LIKE :k"),
            {"k": f"payment:{payment_id}%"},
        )
    return int(count or 0)


async def inbox_count(live: Live, event_id: str) -> int:
    async with live.runtime.db.session() as session:
        count = await session.scalar(
            text("SELECT count(*) FROM payment_events WHERE id = :i"), {"i": event_id}
        )
    return int(count or 0)


class TestRefused:
    @pytest.mark.parametrize(
        ("secrets", "age", "reason"),
        [
            (["whsec_attacker"], 0, "mismatch"),
            ([SIM_SECRET], 600, "too_old"),  # a 10-minute-old timestamp, validly signed
            ([SIM_SECRET], -600, "too_new"),
        ],
    )
    async def test_refused_logged_and_never_posted(
        self, live: Live, secrets: list[str], age: int, reason: str
    ) -> None:
        caller = await live.reseller()
        event = intent_event(caller.id)
        sample = ("surge_payments_webhooks_total", {"outcome": f"refused_{reason}"})
        before = REGISTRY.get_sample_value(*sample) or 0.0
        with capture_logs() as logs:
            response = await post(live, event, secrets=secrets, at=int(time.time()) - age)
        assert response.status_code == 400, response.text
        assert REGISTRY.get_sample_value(*sample) == before + 1
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["reason"] == reason
        assert any(e["event"] == "payments.webhook.refused" and e["reason"] == reason for e in logs)
        await live.settled()
        assert await inbox_count(live, event["id"]) == 0
        assert await ledger_count(live, event["data"]["object"]["id"]) == 0

    async def test_unsigned_and_malformed_headers(self, live: Live) -> None:
        raw = json.dumps(intent_event(uuid.uuid4())).encode()
        for headers in ({}, {"Stripe-Signature": "t=abc,v1=00"}, {"Stripe-Signature": "v1=00"}):
            response = await live.api.post(
                "/api/v1/webhooks/payments", content=raw, headers=headers
            )
            assert response.status_code == 400, (headers, response.text)

    async def test_reserialised_body_does_not_verify(self, live: Live) -> None:
        """The signature covers the bytes sent; the same JSON spelled otherwise fails."""
        event = intent_event(uuid.uuid4())
        signed = json.dumps(event).encode()
        signature = webhooks.header([SIM_SECRET], signed, int(time.time()))
        response = await live.api.post(
            "/api/v1/webhooks/payments",
            content=json.dumps(event, indent=1).encode(),
            headers={"Stripe-Signature": signature},
        )
        assert response.status_code == 400

    async def test_replayed_event_id_is_refused(self, live: Live) -> None:
        caller = await live.reseller()
        event = intent_event(caller.id)
        first = await post(live, event, secrets=[SIM_SECRET])
        assert first.json() == {"received": True, "event_id": event["id"], "duplicate": False}
        with capture_logs() as logs:
            # The same event id again, freshly and validly signed, even with another body.
            event["data"]["object"]["amount_received"] = 999_999
            again = await post(live, event, secrets=[SIM_SECRET])
        assert again.json()["duplicate"] is True
        assert any(e["event"] == "payments.webhook.replay_refused" for e in logs)
        await live.settled()
        assert await inbox_count(live, event["id"]) == 1
        assert await ledger_count(live, event["data"]["object"]["id"]) == 1
        wallet = await live.api.get("/api/v1/wallet", headers=caller.headers)
        assert wallet.json()["balance"] == 1_200


class TestRotation:
    async def test_old_secret_accepted_during_overlap(self, live: Live) -> None:
        caller = await live.reseller()
        await live.sim.control(secrets=[OLD_SECRET])  # the provider still signs with it
        body = (await live.topup(caller, amount=1_000, card="pm_card_slow")).json()
        await live.settled()
        got = await live.api.get(f"/api/v1/topups/{body['id']}", headers=caller.headers)
        assert got.json()["status"] == "succeeded"

    async def test_both_signatures_during_rotation(self, live: Live) -> None:
        caller = await live.reseller()
        event = intent_event(caller.id)
        response = await post(live, event, secrets=["whsec_brand_new", SIM_SECRET])
        assert response.status_code == 200
        assert (
            await post(live, intent_event(caller.id), secrets=["whsec_brand_new"])
        ).status_code == 400


class TestDeadLetters:
    async def test_unknown_payment_is_dead_and_visible_to_admins(self, live: Live) -> None:
        event = intent_event(uuid.uuid4())
        del event["data"]["object"]["metadata"]  # not a payment Surge asked for
        assert (await post(live, event, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        _, tokens, _ = await make_admin(live.app, live.api)
        dead = await live.api.get(
            "/api/admin/payments/events?state=dead&limit=100", headers=bearer(tokens)
        )
        assert dead.status_code == 200, dead.text
        found = [e for e in dead.json()["items"] if e["id"] == event["id"]]
        assert found
        assert "not a Surge top-up" in found[0]["last_error"]
        retried = await live.api.post(
            f"/api/admin/payments/events/{event['id']}/retry", headers=bearer(tokens)
        )
        assert retried.status_code == 200
        assert retried.json()["state"] == "pending"
        await live.settled()  # processed again: still not Surge's, so dead again
        dead = await live.api.get(
            "/api/admin/payments/events?state=dead&limit=100", headers=bearer(tokens)
        )
        assert [e["attempts"] for e in dead.json()["items"] if e["id"] == event["id"]] == [1]
        processed = intent_event(uuid.uuid4())
        assert (await post(live, processed, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        again = await live.api.post(
            f"/api/admin/payments/events/{processed['id']}/retry", headers=bearer(tokens)
        )
        assert again.status_code == 409
        missing = await live.api.post(
            "/api/admin/payments/events/evt_nope/retry", headers=bearer(tokens)
        )
        assert missing.status_code == 404

    async def test_admin_view_needs_mfa_admin(self, live: Live) -> None:
        caller = await live.reseller()
        response = await live.api.get("/api/admin/payments/events", headers=caller.headers)
        assert response.status_code == 403


class TestRateLimits:
    async def test_signed_callbacks_are_not_throttled_as_anonymous(
        self, server_urls: tuple[str, str], sim_url: str
    ) -> None:
        from surge.app import create_app

        settings = payment_settings(
            *server_urls, sim_url, RATELIMIT_ENABLED=True,
            RATELIMIT_KEY_PREFIX=f"rl-{uuid.uuid4().hex[:8]}:",
        )  # fmt: skip
        async for api in app_client(create_app(settings)):
            for _ in range(60):  # more than the anonymous 50 / 15 min
                raw = json.dumps(intent_event(uuid.uuid4())).encode()
                response = await api.post(
                    "/api/v1/webhooks/payments", content=raw,
                    headers={"Stripe-Signature": webhooks.header([SIM_SECRET], raw, int(time.time()))},
                )  # fmt: skip
                assert response.status_code == 200, response.text
            anonymous = [(await api.get("/api/v1/topups")).status_code for _ in range(60)]
            assert 429 in anonymous  # the limiter is on: other anonymous calls are limited


class TestSimulatorFaults:
    async def test_old_timestamps_are_refused_until_the_provider_signs_fresh(
        self, live: Live
    ) -> None:
        """The provider signs with a 10-minute-old timestamp: every delivery is refused (400,
        no inbox row) and retried; once it signs fresh, the retry lands and credits once."""
        caller = await live.reseller()
        await live.sim.control(old_timestamp=True, delay=0.1)
        body = (await live.topup(caller, amount=900, card="pm_card_slow")).json()
        before = (await live.sim.state())["counters"].get("status_400", 0)

        async def refused_twice(_: Runtime) -> bool:
            return bool((await live.sim.state())["counters"].get("status_400", 0) >= before + 2)

        await wait_for(live.runtime, refused_twice, 30)
        async with live.runtime.db.session() as session:
            inbox = await session.scalar(
                text("SELECT count(*) FROM payment_events WHERE payment_id = :p"),
                {"p": body["provider_payment_id"]},
            )
        assert inbox == 0
        await live.sim.control(old_timestamp=False)
        await live.settled()
        got = await live.api.get(f"/api/v1/topups/{body['id']}", headers=caller.headers)
        assert (got.json()["status"], got.json()["amount_credited"]) == ("succeeded", 900)
        assert await ledger_count(live, body["provider_payment_id"]) == 1
