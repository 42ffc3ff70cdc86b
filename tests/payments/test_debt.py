"""Attacks on reversals of top-up credit the owner already spent (ADR 0042): top up, spend,
charge back, then try to withdraw, spend again, replay the webhook, race the reversals.

The reversal always posts (the provider has the money back already); what the wallet
cannot cover is advanced by the receivables account and owed. After every attack no money
is created or lost: the ledger sums to zero and every invariant holds, the debt included.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from surge.payments import repository as payments_repository
from surge.payments.reversals import reinstate
from surge.wallet.funds import funds as funds_service
from surge.wallet.ledger import WalletInDebt
from surge.wallet.service import wallet as wallet_service
from tests.fixtures.factories import Caller, bearer, make_admin
from tests.fixtures.payments import SIM_SECRET
from tests.payments.conftest import Live
from tests.payments.test_attacks import (
    assert_invariants,
    dispute_event,
    refund_event,
    topup_of,
)
from tests.payments.test_topups import postings
from tests.payments.test_webhooks import post
from tests.wallet.factories import fund


async def wallet(live: Live, caller: Caller) -> dict[str, Any]:
    got = await live.api.get("/api/v1/wallet", headers=caller.headers)
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


async def spend(live: Live, caller: Caller, amount: int) -> None:
    """An operation the platform delivered: reserved, then settled (posted to sales)."""
    async with live.runtime.db.session() as session:
        hold = await funds_service.reserve(
            session, caller.id, amount=amount, currency="USD", key=f"op:{uuid.uuid4()}",
            kind="operation",
        )  # fmt: skip
        await funds_service.settle(session, hold, key=f"op:{hold}:settle", kind="operation")
        await session.commit()


async def withdraw(live: Live, caller: Caller, amount: int) -> Any:
    return await live.api.post(
        "/api/v1/withdrawals",
        json={"amount": amount},
        headers={**caller.headers, "Idempotency-Key": uuid.uuid4().hex},
    )


async def buy_signal(live: Live, caller: Caller) -> Any:
    return await live.api.post(
        "/api/v1/operations",
        json={"kind": "signal", "card": "4000000000000002"},
        headers={**caller.headers, "Idempotency-Key": uuid.uuid4().hex},
    )


async def in_debt_after_chargeback(live: Live, amount: int = 2_000) -> tuple[Caller, str, str]:
    """A reseller who topped up ``amount``, spent it all, and lost the chargeback:
    (reseller, payment id, dispute id)."""
    caller = await live.reseller()
    body = (await live.topup(caller, amount=amount)).json()
    await live.settled()
    await spend(live, caller, amount)
    dispute = await live.sim.dispute(body["provider_payment_id"])
    await live.settled()
    return caller, body["provider_payment_id"], str(dispute["id"])


async def earn(live: Live, caller: Caller, amount: int) -> None:
    """A revenue event whose whole profit is ``caller``'s earning (100 % share and
    commission), credited by the real earnings batch."""
    runtime = live.runtime
    async with runtime.db.session() as session:
        await wallet_service.set_partner(
            session, runtime, caller.id, share_bps=10_000, commission_bps=10_000
        )
        await session.commit()
    event_id = f"ev-{uuid.uuid4()}"
    async with runtime.db.session() as session:
        await wallet_service.record_revenue_event(
            session, runtime, event_id=event_id, kind="sale", profit=amount
        )
        await session.commit()
    async with runtime.db.session() as session:
        after = None
        while True:
            after = await wallet_service.credit_earnings_batch(
                session, runtime, event_id=event_id, after=after
            )
            if after is None:
                break
        await session.commit()


class TestChargebackOfSpentCredit:
    async def test_the_reversal_posts_and_the_shortfall_is_owed(self, live: Live) -> None:
        caller, payment_id, _ = await in_debt_after_chargeback(live)
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["available"], seen["debt"]) == (0, 0, 2_000)
        assert (seen["withdrawable"], seen["spendable"]) == (0, 0)
        kinds = [p["kind"] for p in await postings(live, payment_id)]
        # Posted in full, not dead-lettered: the shortfall advanced, then the dispute.
        assert kinds == ["topup", "debt", "topup_dispute"]
        async with live.runtime.db.session() as session:
            dead = await session.scalar(
                text(
                    "SELECT count(*) FROM payment_events WHERE payment_id = :p AND state = 'dead'"
                ),
                {"p": payment_id},
            )
        assert dead == 0
        await assert_invariants(live)

    async def test_reserved_money_is_not_taken_the_rest_is_owed(self, live: Live) -> None:
        """An operation in flight keeps its reservation; the reversal takes what is free,
        the rest is owed; the operation failing releases its money into the debt."""
        caller = await live.reseller()
        body = (await live.topup(caller, amount=2_000)).json()
        await live.settled()
        async with live.runtime.db.session() as session:
            hold = await funds_service.reserve(
                session, caller.id, amount=1_500, currency="USD", key=f"op:{uuid.uuid4()}",
                kind="operation",
            )  # fmt: skip
            await session.commit()
        await live.sim.refund(body["provider_payment_id"])
        await live.settled()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["available"], seen["debt"]) == (1_500, 0, 1_500)
        async with live.runtime.db.session() as session:
            await funds_service.release(session, hold, key=f"op:{hold}:release", kind="operation")
            await session.commit()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["available"], seen["debt"]) == (0, 0, 0)
        assert (await topup_of(live, caller, body["id"]))["status"] == "refunded"
        await assert_invariants(live)


class TestWhileInDebt:
    async def test_no_withdrawal_no_purchase(self, live: Live) -> None:
        caller, _, _ = await in_debt_after_chargeback(live)
        async with live.runtime.db.session() as session:  # an adjustment the debt ignores
            await fund(session, caller.id, 1_500)
            await session.commit()
        seen = await wallet(live, caller)
        assert (seen["available"], seen["debt"], seen["spendable"]) == (1_500, 2_000, 0)
        refused = await withdraw(live, caller, 1_000)
        assert refused.status_code == 409, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["debt"] == 2_000
        bought = await buy_signal(live, caller)
        assert bought.status_code == 409, bought.text
        assert bought.headers["content-type"] == "application/problem+json"
        assert "debt" in bought.json()["detail"]
        with pytest.raises(WalletInDebt):  # the ledger's own rule, whatever the caller
            async with live.runtime.db.session() as session:
                await funds_service.reserve(
                    session, caller.id, amount=100, currency="USD", key=f"op:{uuid.uuid4()}",
                    kind="operation",
                )  # fmt: skip
        assert (await wallet(live, caller))["available"] == 1_500
        await assert_invariants(live)

    async def test_a_pending_withdrawal_is_not_paid_out(self, live: Live) -> None:
        """Earnings withdrawn while top-up credit is spent; the chargeback lands before the
        admin approves: approving is refused, rejecting repays the debt with the amount."""
        caller = await live.reseller()
        async with live.runtime.db.session() as session:
            await fund(session, caller.id, 3_000)  # earned, withdrawable
            await session.commit()
        body = (await live.topup(caller, amount=2_000)).json()
        await live.settled()
        await spend(live, caller, 2_000)
        made = await withdraw(live, caller, 3_000)
        assert made.status_code == 201, made.text
        await live.sim.dispute(body["provider_payment_id"])
        await live.settled()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["available"], seen["debt"]) == (3_000, 0, 2_000)
        _, tokens, _ = await make_admin(live.app, live.api)
        admin = bearer(tokens)
        path = f"/api/admin/withdrawals/{made.json()['id']}"
        refused = await live.api.post(f"{path}/approve", headers=admin)
        assert refused.status_code == 409, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        batch = await live.api.post(
            "/api/admin/withdrawals/batch-approve", json={"ids": [made.json()["id"]]},
            headers=admin,
        )  # fmt: skip
        assert batch.status_code == 200, batch.text
        assert [item["ok"] for item in batch.json()["results"]] == [False]
        rejected = await live.api.post(f"{path}/reject", json={"reason": "debt"}, headers=admin)
        assert rejected.status_code == 200, rejected.text
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["available"], seen["debt"]) == (1_000, 1_000, 0)
        assert seen["withdrawable"] == 1_000
        await assert_invariants(live)


class TestRepayment:
    async def test_top_ups_and_earnings_repay_first(self, live: Live) -> None:
        caller, _, _ = await in_debt_after_chargeback(live)
        await live.topup(caller, amount=1_500)
        await live.settled()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["debt"]) == (0, 500)
        await earn(live, caller, 800)
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["debt"], seen["spendable"]) == (300, 0, 300)
        # The top-up repaid the debt, so the 300 left stands in for it: a top-up that
        # repays a debt stays locked as unspent credit until purchases spend it, or a
        # stolen card repaying a chargeback would free the earnings for a payout ahead of
        # its own chargeback (ADR 0045).
        assert seen["withdrawable"] == 0
        assert (await buy_signal(live, caller)).status_code in (200, 201, 202)
        await assert_invariants(live)

    async def test_a_won_dispute_repays_and_is_final(self, live: Live) -> None:
        caller = await live.reseller()
        body = (await live.topup(caller, amount=2_000)).json()
        await live.settled()
        await spend(live, caller, 2_000)
        dispute = await live.sim.dispute(body["provider_payment_id"])
        await live.settled()
        assert (await wallet(live, caller))["debt"] == 2_000
        await live.sim.win(dispute["id"])
        await live.settled()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["debt"]) == (0, 0)
        topup = await topup_of(live, caller, body["id"])
        assert (topup["status"], topup["amount_reversed"]) == ("dispute_won", 0)
        # A late or re-sent withdrawal event does not take the status (or money) back.
        late = dispute_event(
            body["provider_payment_id"], dispute["id"], amount=2_000,
            type_="charge.dispute.funds_withdrawn", created=int(time.time()),
        )  # fmt: skip
        assert (await post(live, late, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        assert (await topup_of(live, caller, body["id"]))["status"] == "dispute_won"
        assert (await wallet(live, caller))["debt"] == 0
        await assert_invariants(live)

    async def test_reinstating_twice_in_one_transaction_gives_back_once(self, live: Live) -> None:
        caller, payment_id, dispute_id = await in_debt_after_chargeback(live)
        async with live.runtime.db.session() as session:
            topup = await payments_repository.topup_by_payment(session, payment_id)
            assert topup is not None
            obj = {"id": dispute_id, "amount": 2_000}
            assert await reinstate(session, topup, obj)
            assert await reinstate(session, topup, obj)
            await session.commit()
        assert (await wallet(live, caller))["debt"] == 0
        await assert_invariants(live)


class TestReplaysAndRaces:
    async def test_a_replayed_chargeback_moves_nothing(self, live: Live) -> None:
        caller, payment_id, dispute_id = await in_debt_after_chargeback(live)
        event = dispute_event(
            payment_id, dispute_id, amount=2_000, type_="charge.dispute.funds_withdrawn",
            created=int(time.time()),
        )  # fmt: skip
        for _ in range(2):  # the same dispute under a new event id, then the exact replay
            assert (await post(live, event, secrets=[SIM_SECRET])).status_code == 200
        await live.settled()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["debt"]) == (0, 2_000)
        assert [p["kind"] for p in await postings(live, payment_id)].count("topup_dispute") == 1
        await assert_invariants(live)

    async def test_a_refund_and_a_dispute_racing_take_the_payment_once(self, live: Live) -> None:
        caller = await live.reseller()
        body = (await live.topup(caller, amount=2_000)).json()
        await live.settled()
        await spend(live, caller, 1_500)
        payment_id, now = body["provider_payment_id"], int(time.time())
        refund = refund_event(payment_id, captured=2_000, refunds=[2_000])
        dispute = dispute_event(
            payment_id, f"dp_{uuid.uuid4().hex}", amount=2_000,
            type_="charge.dispute.funds_withdrawn", created=now,
        )  # fmt: skip
        replies = await asyncio.gather(
            *(post(live, e, secrets=[SIM_SECRET]) for e in (refund, dispute, refund, dispute))
        )
        assert [r.status_code for r in replies] == [200] * 4
        await live.settled()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["debt"]) == (0, 1_500)  # 2 000 back, 500 was free
        assert (await topup_of(live, caller, body["id"]))["amount_reversed"] == 2_000
        await assert_invariants(live)

    async def test_reversals_of_two_payments_racing_size_the_debt_exactly(self, live: Live) -> None:
        """Two chargebacks of one owner at once (different payments, so different job
        locks): each sizes its shortfall under the wallet's lock."""
        caller = await live.reseller()
        first = (await live.topup(caller, amount=2_000)).json()
        second = (await live.topup(caller, amount=2_000)).json()
        await live.settled()
        await spend(live, caller, 3_000)
        topups = [first, second]

        async def charge_back(index: int) -> None:
            async with live.runtime.db.session() as session:
                await funds_service.reverse(
                    session, caller.id, amount=2_000, currency="USD",
                    key=f"payment:{topups[index]['provider_payment_id']}:dispute:race",
                    kind="topup_dispute",
                )  # fmt: skip
                await session.commit()

        await asyncio.gather(charge_back(0), charge_back(1), charge_back(0), charge_back(1))
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["available"], seen["debt"]) == (0, 0, 3_000)
        await assert_invariants(live)
