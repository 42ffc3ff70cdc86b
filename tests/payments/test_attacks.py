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
from surge.wallet.funds import funds as funds_service
from surge.wallet.ledger import ledger
from tests.fixtures.factories import Caller
from tests.fixtures.payments import SIM_SECRET
from tests.payments.conftest import Live
from tests.payments.test_topups import balance, postings
from tests.payments.test_webhooks import intent_event, post
from tests.wallet.factories import fund


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


class TestOutOfOrder:
    async def test_succeeded_after_refunded_credits_once_and_stays_refunded(
        self, live: Live
    ) -> None:
        """The refund's event arrives (and is applied) before the payment's own: the refund
        implies the credit, the late ``succeeded`` neither credits again nor un-refunds."""
        caller = await live.reseller()
        succeeded = intent_event(caller.id, amount=1_200)
        obj = succeeded["data"]["object"]
        payment_id = obj["id"]
        refunded = refund_event(payment_id, captured=1_200, refunds=[1_200])
        refunded["data"]["object"]["metadata"] = obj["metadata"]
        refunded["created"] = succeeded["created"] + 5
        assert (await post(live, refunded, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert (await post(live, succeeded, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 0
        assert [p["kind"] for p in await postings(live, payment_id)] == ["topup", "topup_refund"]
        row = await topup_of(live, caller, obj["metadata"]["topup_id"])
        assert (row["status"], row["amount_credited"], row["amount_reversed"]) == (
            "refunded",
            1_200,
            1_200,
        )
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


class TestTopupCashOut:
    """Stolen card → top-up → withdrawal → chargeback: the provider takes the money back
    from the platform while the payout already left. Top-up credit buys operations; only
    earnings (and adjustments) can be withdrawn."""

    async def withdraw(self, live: Live, caller: Caller, amount: int) -> Any:
        return await live.api.post(
            "/api/v1/withdrawals",
            json={"amount": amount},
            headers={**caller.headers, "Idempotency-Key": uuid.uuid4().hex},
        )

    async def test_top_up_credit_cannot_be_withdrawn(self, live: Live) -> None:
        caller = await live.reseller()
        body = (await live.topup(caller, amount=10_000)).json()
        await live.settled()
        assert await balance(live, caller) == 10_000
        wallet = (await live.api.get("/api/v1/wallet", headers=caller.headers)).json()
        assert (wallet["available"], wallet["withdrawable"]) == (10_000, 0)
        refused = await self.withdraw(live, caller, 10_000)
        assert refused.status_code == 409, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["withdrawable"] == 0
        # The chargeback then takes back exactly what came in: nothing was paid out.
        await live.sim.dispute(body["provider_payment_id"])
        await live.settled()
        assert await balance(live, caller) == 0
        await assert_invariants(live)

    async def test_earnings_stay_withdrawable_next_to_top_up_credit(self, live: Live) -> None:
        caller = await live.reseller()
        await live.topup(caller, amount=10_000)
        async with live.runtime.db.session() as session:  # an earning (or an adjustment)
            await fund(session, caller.id, 3_000)
        await live.settled()
        assert (await self.withdraw(live, caller, 3_001)).json()["withdrawable"] == 3_000
        made = await self.withdraw(live, caller, 3_000)
        assert made.status_code == 201, made.text
        await assert_invariants(live)

    async def test_spent_top_up_credit_is_spent_first(self, live: Live) -> None:
        """Operations consume top-up credit before earnings: a reseller who bought with its
        top-ups may still withdraw what it earned."""
        caller = await live.reseller()
        await live.topup(caller, amount=10_000)
        async with live.runtime.db.session() as session:
            await fund(session, caller.id, 3_000)
            hold = await funds_service.reserve(
                session, caller.id, amount=8_000, currency="USD", key=f"op:{uuid.uuid4()}",
                kind="operation",
            )  # fmt: skip
            await funds_service.settle(session, hold, key=f"op:{hold}:settle", kind="operation")
            await session.commit()
        await live.settled()
        assert await balance(live, caller) == 5_000  # 2 000 of top-up left, 3 000 earned
        wallet = (await live.api.get("/api/v1/wallet", headers=caller.headers)).json()
        assert (wallet["available"], wallet["withdrawable"]) == (5_000, 3_000)
        assert (await self.withdraw(live, caller, 3_001)).status_code == 409
        assert (await self.withdraw(live, caller, 3_000)).status_code == 201
        await assert_invariants(live)

    async def test_concurrent_withdrawals_never_reach_top_up_credit(self, live: Live) -> None:
        """Each request alone fits what is withdrawable; together they would need top-up
        credit: the check and the reservation are one locked step, so only some pass."""
        caller = await live.reseller()
        await live.topup(caller, amount=10_000)
        async with live.runtime.db.session() as session:
            await fund(session, caller.id, 3_000)
        await live.settled()
        replies = await asyncio.gather(*(self.withdraw(live, caller, 1_000) for _ in range(8)))
        assert sorted(r.status_code for r in replies) == [201] * 3 + [409] * 5
        wallet = (await live.api.get("/api/v1/wallet", headers=caller.headers)).json()
        assert (wallet["balance"], wallet["available"]) == (13_000, 10_000)
        assert wallet["withdrawable"] == 0  # what is left is top-up credit
        await assert_invariants(live)


def dispute_event(
    payment_id: str, dispute_id: str, *, amount: int, type_: str, created: int
) -> dict[str, Any]:
    """A ``charge.dispute.*`` event as the provider signs it."""
    won = type_.endswith("funds_reinstated")
    dispute = {
        "id": dispute_id, "object": "dispute", "amount": amount, "currency": "usd",
        "payment_intent": payment_id, "charge": f"ch_{uuid.uuid4().hex[:12]}",
        "status": "won" if won else "needs_response", "reason": "fraudulent",
    }  # fmt: skip
    return {
        "id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": type_,
        "created": created, "data": {"object": dispute},
    }  # fmt: skip


class TestWonDisputes:
    """``charge.dispute.funds_reinstated``: the merchant won, the provider gives the disputed
    money back. It comes back once, per dispute, and the reversal cap counts it."""

    async def test_a_won_dispute_gives_the_money_back_once(self, live: Live) -> None:
        caller = await live.reseller()
        first = (await live.topup(caller, amount=2_000)).json()
        payment_id = first["provider_payment_id"]
        dispute = await live.sim.dispute(payment_id)
        await live.settled()
        assert await balance(live, caller) == 0
        await live.sim.win(dispute["id"])
        await live.settled()
        assert await balance(live, caller) == 2_000
        topup = await topup_of(live, caller, first["id"])
        assert topup["amount_reversed"] == 0
        # The provider sends it again under another event id: the dispute is the key.
        again = dispute_event(
            payment_id, dispute["id"], amount=2_000,
            type_="charge.dispute.funds_reinstated", created=int(time.time()),
        )  # fmt: skip
        assert (await post(live, again, secrets=[SIM_SECRET])).status_code == 200
        assert (await post(live, again, secrets=[SIM_SECRET])).json()["duplicate"] is True
        await live.settled()
        assert await balance(live, caller) == 2_000
        await assert_invariants(live)

    async def test_the_reversal_cap_counts_the_reinstated_money(self, live: Live) -> None:
        """Dispute lost then won, then a full refund: the payment's 2 000 may go back out
        again (it came back in); without lowering ``amount_reversed`` the refund would be
        capped to nothing and the owner would keep money the provider refunded."""
        caller = await live.reseller()
        first = (await live.topup(caller, amount=2_000)).json()
        await live.topup(caller, amount=5_000)
        payment_id = first["provider_payment_id"]
        dispute = await live.sim.dispute(payment_id)
        await live.settled()
        await live.sim.win(dispute["id"])
        await live.settled()
        event = refund_event(payment_id, captured=2_000, refunds=[2_000])
        assert (await post(live, event, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 5_000
        assert (await topup_of(live, caller, first["id"]))["amount_reversed"] == 2_000
        kinds = [p["kind"] for p in await postings(live, payment_id)]
        assert kinds.count("topup_refund") == 1  # the refund was not capped to nothing
        await assert_invariants(live)

    async def test_reinstated_before_withdrawn_implies_it(self, live: Live) -> None:
        """The won event is applied first (the withdrawal's delivery was lost, then retried):
        a won dispute implies its withdrawal, applied with it under the withdrawal's own key,
        so the late withdrawal event finds it done — never a credit of money not taken."""
        caller = await live.reseller()
        first = (await live.topup(caller, amount=2_000)).json()
        await live.settled()
        payment_id, dispute_id, now = first["provider_payment_id"], f"dp_{uuid.uuid4().hex}", int(time.time())  # fmt: skip
        won = dispute_event(payment_id, dispute_id, amount=2_000,
                            type_="charge.dispute.funds_reinstated", created=now + 1)  # fmt: skip
        assert (await post(live, won, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 2_000  # taken and given back: never 4 000
        lost = dispute_event(payment_id, dispute_id, amount=2_000,
                             type_="charge.dispute.funds_withdrawn", created=now)  # fmt: skip
        assert (await post(live, lost, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 2_000
        assert (await topup_of(live, caller, first["id"]))["amount_reversed"] == 0
        await assert_invariants(live)

    async def test_a_won_dispute_that_took_nothing_gives_nothing(self, live: Live) -> None:
        """Refunded in full, then disputed (the cap took nothing), then won: no money."""
        caller = await live.reseller()
        first = (await live.topup(caller, amount=2_000)).json()
        await live.topup(caller, amount=5_000)
        await live.settled()
        payment_id, dispute_id, now = first["provider_payment_id"], f"dp_{uuid.uuid4().hex}", int(time.time())  # fmt: skip
        event = refund_event(payment_id, captured=2_000, refunds=[2_000])
        assert (await post(live, event, secrets=[SIM_SECRET])).status_code == 200
        for type_, created in (("funds_withdrawn", now + 1), ("funds_reinstated", now + 2)):
            event = dispute_event(payment_id, dispute_id, amount=2_000,
                                  type_=f"charge.dispute.{type_}", created=created)  # fmt: skip
            assert (await post(live, event, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 5_000
        assert (await topup_of(live, caller, first["id"]))["amount_reversed"] == 2_000
        await assert_invariants(live)


class TestEventAmountsBeyondTheTopup:
    """The provider's event is signed, but a top-up is an amount Surge asked for: a credit
    larger than it (an intent amended on the provider's side, a misconfigured capture, a
    leaked signing secret) is a dead letter for an operator, never money (ADR 0051)."""

    async def test_an_intent_received_beyond_its_amount_credits_nothing(self, live: Live) -> None:
        caller = await live.reseller()
        event = intent_event(caller.id, amount=1_200)
        event["data"]["object"]["amount_received"] = 120_000
        assert (await post(live, event, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 0
        assert await event_state(live, event["id"]) == "dead"
        await assert_invariants(live)

    async def test_a_forged_larger_success_for_a_real_topup_changes_nothing(
        self, live: Live
    ) -> None:
        """The real payment's own success comes a moment later from the simulator; the
        larger one, whichever is applied first, never credits its figure."""
        caller = await live.reseller()
        made = (await live.topup(caller, amount=1_000, card="pm_card_slow")).json()
        assert made["status"] == "processing"
        event = intent_event(caller.id, amount=1_000)
        event["data"]["object"].update(id=made["provider_payment_id"], amount_received=99_000)
        assert (await post(live, event, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 1_000
        assert (await topup_of(live, caller, made["id"]))["amount_credited"] == 1_000
        await assert_invariants(live)

    async def test_a_refund_event_capturing_more_credits_nothing(self, live: Live) -> None:
        """``charge.refunded`` implies the credit of what was captured (a refund may arrive
        before the payment's own event): captured beyond the top-up is refused whole."""
        caller = await live.reseller()
        first = intent_event(caller.id, amount=1_500)
        first["data"]["object"].update(status="processing", amount_received=0)
        first["type"] = "payment_intent.processing"
        assert (await post(live, first, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        payment_id = first["data"]["object"]["id"]
        refund = refund_event(payment_id, captured=50_000, refunds=[100])
        assert (await post(live, refund, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert await balance(live, caller) == 0
        assert await event_state(live, refund["id"]) == "dead"
        await assert_invariants(live)


async def event_state(live: Live, event_id: str) -> str:
    async with live.runtime.db.session() as session:
        state = await session.scalar(
            text("SELECT state FROM payment_events WHERE id = :i"), {"i": event_id}
        )
    return str(state)
