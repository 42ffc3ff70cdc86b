"""Attacks on the order of top-ups, purchases and withdrawals (ADR 0045), through the real
app and the provider simulator: ``withdrawable`` follows the top-up credit still in the
wallet, so purchases can only spend credit that was there, never a later top-up.

The hole it closes: earn 1 000, buy 1 000 of operations with it, then top up 1 000 with a
stolen card — ADR 0033's order-blind ``topup_net − purchases_posted`` was 0, so all of the
card's money was withdrawable, and its chargeback arrived after the payout. After every
attack the invariants hold, rule 3d included (each wallet's unspent top-up credit replayed
from its entries in posting order).
"""

from __future__ import annotations

import asyncio
import uuid

from surge.wallet.accounts import SystemAccount
from surge.wallet.funds import funds as funds_service
from surge.wallet.ledger import ledger
from tests.fixtures.factories import Caller
from tests.payments.conftest import Live
from tests.payments.test_attacks import assert_invariants
from tests.payments.test_debt import earn, spend, wallet, withdraw


async def give_back(live: Live, caller: Caller, amount: int) -> None:
    """Sales gives a purchase back to the owner (a refunded operation)."""
    async with live.runtime.db.session() as session:
        sales = await ledger.system_account(session, SystemAccount.sales, currency="USD")
        own = await ledger.open_wallet(session, caller.id, currency="USD")
        await ledger.transfer(
            session, key=f"refund:{uuid.uuid4()}", debit=sales, credit=own, amount=amount,
            currency="USD", kind="operation_refund",
        )  # fmt: skip
        await session.commit()


async def figures(live: Live, caller: Caller) -> tuple[int, int, int]:
    seen = await wallet(live, caller)
    return seen["balance"], seen["available"], seen["withdrawable"]


class TestLaterTopUpIsNotAbsorbed:
    async def test_earn_spend_then_a_stolen_card_withdraws_nothing(self, live: Live) -> None:
        caller = await live.reseller()
        await earn(live, caller, 1_000)
        await spend(live, caller, 1_000)  # the earnings bought operations
        body = (await live.topup(caller, amount=1_000)).json()  # then the stolen card
        await live.settled()
        assert await figures(live, caller) == (1_000, 1_000, 0)
        refused = await withdraw(live, caller, 1_000)
        assert refused.status_code == 409, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["withdrawable"] == 0
        # The chargeback finds the card's money still there: no debt, nothing lost.
        await live.sim.dispute(body["provider_payment_id"])
        await live.settled()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["debt"], seen["withdrawable"]) == (0, 0, 0)
        await assert_invariants(live)

    async def test_earnings_alone_are_withdrawn(self, live: Live) -> None:
        caller = await live.reseller()
        await earn(live, caller, 1_000)
        assert await figures(live, caller) == (1_000, 1_000, 1_000)
        made = await withdraw(live, caller, 1_000)
        assert made.status_code == 201, made.text
        await assert_invariants(live)

    async def test_top_up_spend_then_withdraw_the_earnings(self, live: Live) -> None:
        """Purchases still spend the top-up credit that was there first."""
        caller = await live.reseller()
        await live.topup(caller, amount=10_000)
        await live.settled()
        await spend(live, caller, 6_000)
        await earn(live, caller, 5_000)
        assert await figures(live, caller) == (9_000, 9_000, 5_000)  # 4 000 of top-up credit left
        await spend(live, caller, 4_000)
        assert await figures(live, caller) == (5_000, 5_000, 5_000)
        assert (await withdraw(live, caller, 5_001)).status_code == 409
        made = await withdraw(live, caller, 5_000)
        assert made.status_code == 201, made.text
        await assert_invariants(live)

    async def test_earnings_after_top_up_credit_was_spent(self, live: Live) -> None:
        caller = await live.reseller()
        await live.topup(caller, amount=1_000)
        await live.settled()
        await spend(live, caller, 1_000)
        await earn(live, caller, 700)
        assert await figures(live, caller) == (700, 700, 700)
        await live.topup(caller, amount=1_000)
        await live.settled()
        assert await figures(live, caller) == (1_700, 1_700, 700)
        await assert_invariants(live)


class TestGivenBackPurchases:
    async def test_a_purchase_paid_by_top_up_comes_back_as_top_up_credit(self, live: Live) -> None:
        """Top up, buy, get the purchase refunded: the card's money is not laundered into
        withdrawable money by a refunded operation."""
        caller = await live.reseller()
        await live.topup(caller, amount=1_000)
        await live.settled()
        await spend(live, caller, 1_000)
        await give_back(live, caller, 1_000)
        assert await figures(live, caller) == (1_000, 1_000, 0)
        await assert_invariants(live)

    async def test_a_purchase_paid_by_earnings_comes_back_withdrawable(self, live: Live) -> None:
        caller = await live.reseller()
        await earn(live, caller, 1_000)
        await spend(live, caller, 1_000)
        await live.topup(caller, amount=500)
        await live.settled()
        await give_back(live, caller, 1_000)
        assert await figures(live, caller) == (1_500, 1_500, 1_000)
        await assert_invariants(live)


class TestReversalsWithAnOperationInFlight:
    async def test_the_advance_does_not_free_reserved_top_up_credit(self, live: Live) -> None:
        """A spent top-up is charged back while a later top-up is reserved by an operation:
        the shortfall is advanced (ADR 0042), the reserved top-up credit is still top-up
        credit; earnings repay the debt; the operation fails and its money comes back —
        still not withdrawable, and its own chargeback finds it there."""
        caller = await live.reseller()
        first = (await live.topup(caller, amount=500)).json()
        await live.settled()
        await spend(live, caller, 500)
        second = (await live.topup(caller, amount=1_000)).json()
        await live.settled()
        async with live.runtime.db.session() as session:
            hold = await funds_service.reserve(
                session, caller.id, amount=1_000, currency="USD", key=f"op:{uuid.uuid4()}",
                kind="operation",
            )  # fmt: skip
            await session.commit()
        await live.sim.dispute(first["provider_payment_id"])
        await live.settled()
        assert (await wallet(live, caller))["debt"] == 500
        await earn(live, caller, 500)  # repays the debt
        async with live.runtime.db.session() as session:
            await funds_service.release(session, hold, key=f"op:{hold}:release", kind="operation")
            await session.commit()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["available"], seen["debt"]) == (1_000, 1_000, 0)
        assert seen["withdrawable"] == 0
        await live.sim.dispute(second["provider_payment_id"])
        await live.settled()
        seen = await wallet(live, caller)
        assert (seen["balance"], seen["debt"]) == (0, 0)
        await assert_invariants(live)


class TestRaces:
    async def test_two_withdrawals_racing_a_top_up(self, live: Live) -> None:
        """The top-up's credit and the withdrawals' checks each lock the wallet row: in
        whatever order they run, the two withdrawals together get only what was earned and
        not spent, never the card's money."""
        caller = await live.reseller()
        await earn(live, caller, 15_000)
        await spend(live, caller, 10_000)  # 5 000 earned and unspent
        replies = await asyncio.gather(
            live.topup(caller, amount=10_000),
            withdraw(live, caller, 4_000),
            withdraw(live, caller, 4_000),
        )
        await live.settled()
        codes = sorted(r.status_code for r in replies[1:])
        assert codes == [201, 409], [r.text for r in replies]
        assert await figures(live, caller) == (15_000, 11_000, 1_000)
        await assert_invariants(live)

    async def test_withdrawals_racing_a_credit_in_the_same_instant(self, live: Live) -> None:
        """The credit posted by the ledger directly (no webhook latency) against six
        withdrawals: each attempt sees either no top-up or its full unspent credit."""
        caller = await live.reseller()
        await earn(live, caller, 10_000)
        await spend(live, caller, 10_000)

        async def credit() -> None:
            async with live.runtime.db.session() as session:
                await funds_service.credit(
                    session, caller.id, amount=10_000, currency="USD",
                    key=f"payment:race:{uuid.uuid4()}", kind="topup",
                )  # fmt: skip
                await session.commit()

        outcome = await asyncio.gather(credit(), *(withdraw(live, caller, 3_000) for _ in range(6)))
        assert {r.status_code for r in outcome[1:]} == {409}
        assert await figures(live, caller) == (10_000, 10_000, 0)
        await assert_invariants(live)
