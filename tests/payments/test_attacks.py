"""Money coming back out: reversals that would take more than a payment brought in, the same
event delivered many times at once, and a top-up cashed out before its chargeback. Driven
through the provider simulator and validly signed webhooks against the real app; after each
attack the ledger's invariants hold."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from sqlalchemy import text

from surge.kit.security import webhooks
from surge.wallet.ledger import ledger
from tests.fixtures.factories import Caller
from tests.fixtures.payments import SIM_SECRET
from tests.payments.conftest import Live
from tests.payments.test_topups import balance, postings
from tests.payments.test_webhooks import intent_event, post


async def assert_invariants(live: Live) -> None:
    async with live.runtime.db.session() as session:
        assert await ledger.check_invariants(session) == []


async def topup_of(live: Live, caller: Caller, topup_id: str) -> dict[str, Any]:
    got = await live.api.get(f"/api/v1/topups/{topup_id}", headers=caller.headers)
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


def refund_event(payment_id: str, *, captured: int, refunds: list[int]) -> dict[str, Any]:
    """A ``charge.refunded`` as the provider signs it, with ``refunds`` of these amounts."""
    data = [
        {"id": f"re_{uuid.uuid4().hex[:12]}", "object": "refund", "amount": amount,
         "currency": "usd", "payment_intent": payment_id, "status": "succeeded"}
        for amount in refunds
    ]  # fmt: skip
    charge = {
        "id": f"ch_{uuid.uuid4().hex[:12]}", "object": "charge", "payment_intent": payment_id,
        "amount": captured, "amount_captured": captured, "amount_refunded": sum(refunds),
        "currency": "usd", "metadata": {}, "refunds": {"object": "list", "data": data},
    }  # fmt: skip
    return {
        "id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "charge.refunded",
        "created": int(time.time()), "data": {"object": charge},
    }  # fmt: skip


class TestReversalsNeverExceedTheCredit:
    async def test_a_dispute_then_a_refund_of_the_same_payment(self, live: Live) -> None:
        """The cardholder disputes, then the merchant also refunds (the simulator, like a
        careless provider integration, allows both): the payment brought 2 000 in, so at
        most 2 000 goes back out — never the owner's other top-up."""
        caller = await live.reseller()
        first = (await live.topup(caller, amount=2_000)).json()
        await live.topup(caller, amount=5_000)
        await live.sim.dispute(first["provider_payment_id"])
        await live.settled()
        await live.sim.refund(first["provider_payment_id"])
        await live.settled()
        assert await balance(live, caller) == 5_000
        moved = await postings(live, first["provider_payment_id"])
        assert sum(p["amount"] for p in moved if p["kind"] != "topup") == 2_000
        assert (await topup_of(live, caller, first["id"]))["amount_reversed"] == 2_000
        await assert_invariants(live)

    async def test_a_refund_larger_than_the_payment(self, live: Live) -> None:
        caller = await live.reseller()
        first = (await live.topup(caller, amount=2_000)).json()
        await live.topup(caller, amount=5_000)
        await live.settled()
        event = refund_event(first["provider_payment_id"], captured=2_000, refunds=[9_000])
        assert (await post(live, event, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 5_000
        assert (await topup_of(live, caller, first["id"]))["amount_reversed"] == 2_000
        await assert_invariants(live)

    async def test_a_capped_refund_replayed_later_takes_nothing_more(self, live: Live) -> None:
        """Partial refunds 1 500 + 1 500 on a 2 000 payment: the second is capped at 500; the
        provider's next event lists both again, and nothing moves twice (or fails)."""
        caller = await live.reseller()
        first = (await live.topup(caller, amount=2_000)).json()
        await live.topup(caller, amount=5_000)
        await live.settled()
        payment_id = first["provider_payment_id"]
        event = refund_event(payment_id, captured=2_000, refunds=[1_500, 1_500])
        assert (await post(live, event, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        again = dict(event, id=f"evt_{uuid.uuid4().hex}", created=event["created"] + 1)
        assert (await post(live, again, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 5_000
        async with live.runtime.db.session() as session:
            states = (
                await session.execute(
                    text("SELECT DISTINCT state FROM payment_events WHERE payment_id = :p"),
                    {"p": payment_id},
                )
            ).scalars()
            assert set(states) == {"processed"}
        await assert_invariants(live)


class TestSameEventAtOnce:
    async def test_one_event_delivered_concurrently_credits_once(self, live: Live) -> None:
        caller = await live.reseller()
        event = intent_event(caller.id, amount=1_500)
        raw = json.dumps(event).encode()
        headers = {
            "Stripe-Signature": webhooks.header([SIM_SECRET], raw, int(time.time())),
            "Content-Type": "application/json",
        }
        url = "/api/v1/webhooks/payments"
        replies = await asyncio.gather(
            *(live.api.post(url, content=raw, headers=headers) for _ in range(10))
        )
        assert {r.status_code for r in replies} == {200}
        assert sorted(r.json()["duplicate"] for r in replies) == [False] + [True] * 9
        await live.settled()
        assert await balance(live, caller) == 1_500
        assert len(await postings(live, event["data"]["object"]["id"])) == 1
        await assert_invariants(live)
