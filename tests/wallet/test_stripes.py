"""Striped system accounts (ADR 0058): holds and payments are several rows chosen by owner,
so one owner's open withdrawal or top-up no longer holds back every other owner's; each
stripe keeps its own history and guard, the account's balance is their sum, and every
money rule still holds."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.runtime import Runtime
from surge.wallet import accounts
from surge.wallet.accounts import STRIPES, SystemAccount, stripe_of
from surge.wallet.errors import WithdrawalLimitReached
from surge.wallet.funds import funds as funds_service
from surge.wallet.ledger import ledger
from surge.wallet.service import wallet as wallet_service
from tests.fixtures.waiting import eventually
from tests.wallet.factories import create_partner, fund


def owner_on(code: SystemAccount, stripe: int) -> UUID:
    """A fresh owner id whose movements use ``stripe`` of ``code``."""
    while True:
        owner = uuid4()
        if stripe_of(code, owner) == stripe:
            return owner


async def partner_on(runtime: Runtime, stripe: int, *, funds: int = 100_000) -> UUID:
    async with runtime.db.session() as session:
        owner = await create_partner(
            session, runtime, owner_id=owner_on(SystemAccount.holds, stripe)
        )
        await fund(session, owner, funds)
        await session.commit()
    return owner


async def fail_instead_of_waiting(session: AsyncSession) -> None:
    """Make a row lock that is not free at once an error instead of a wait: a test whose
    second transaction queues behind the first fails in seconds rather than hanging."""
    await session.execute(text("SET LOCAL lock_timeout = '2s'"))


async def stripe_row(runtime: Runtime, code: SystemAccount, stripe: int) -> tuple[int, int, int]:
    """(balance, pending_in, pending_out) of one stripe of ``code`` in USD."""
    async with runtime.db.session() as session:
        account = await ledger.system_account(session, code, currency="USD", stripe=stripe)
        balance = await ledger.balance(session, account)
        await session.commit()
    return balance.balance, balance.pending_in, balance.pending_out


async def assert_invariants(runtime: Runtime) -> None:
    async with runtime.db.session() as session:
        assert await ledger.check_invariants(session) == []


class TestWithdrawalsOfDifferentOwners:
    async def test_an_open_request_does_not_hold_back_another_owners(
        self, runtime: Runtime
    ) -> None:
        """The old single holds row: the second request waited for the first's COMMIT (here:
        a lock timeout). Now each reserves into its own stripe."""
        first_owner, second_owner = await partner_on(runtime, 1), await partner_on(runtime, 2)
        async with runtime.db.session() as first:
            await wallet_service.request_withdrawal(first, runtime, first_owner, amount=1_000)
            async with runtime.db.session() as second:
                await fail_instead_of_waiting(second)
                granted = await wallet_service.request_withdrawal(
                    second, runtime, second_owner, amount=2_000
                )
                await second.commit()
            await first.commit()
        assert granted.status == "pending"
        await assert_invariants(runtime)

    async def test_owners_sharing_a_stripe_still_queue_in_lock_order(
        self, runtime: Runtime
    ) -> None:
        """Two owners on one stripe: the second waits (no deadlock, no lost update) and is
        granted once the first commits."""
        first_owner, second_owner = await partner_on(runtime, 3), await partner_on(runtime, 3)
        before = await stripe_row(runtime, SystemAccount.holds, 3)
        async with runtime.db.session() as first:
            await wallet_service.request_withdrawal(first, runtime, first_owner, amount=1_000)
            pid = await first.scalar(text("SELECT pg_backend_pid()"))

            async def second_request() -> None:
                async with runtime.db.session() as second:
                    await wallet_service.request_withdrawal(
                        second, runtime, second_owner, amount=2_000
                    )
                    await second.commit()

            async def blocked_by_first() -> bool:
                async with runtime.db.session() as probe:
                    found = await probe.scalar(
                        text(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE CAST(:pid AS int) = ANY(pg_blocking_pids(pid))"
                        ),
                        {"pid": pid},
                    )
                return bool(found)

            waiting = asyncio.create_task(second_request())
            await eventually(blocked_by_first)  # queued on the stripe's row, as before
            assert not waiting.done()
            await first.commit()
        await waiting
        after = await stripe_row(runtime, SystemAccount.holds, 3)
        assert after[1] - before[1] == 3_000
        await assert_invariants(runtime)


class TestDailyCapAcrossStripes:
    async def test_concurrent_requests_of_many_owners_each_stop_at_their_cap(
        self, runtime: Runtime
    ) -> None:
        """ADR 0051's cap stays exact: a request reads its owner's window under the wallet's
        row lock, which every request of that owner takes, whatever stripe it reserves into."""
        cap = runtime.settings.WALLET_WITHDRAWAL_DAILY_MAX
        step = cap // 4
        owners = [await partner_on(runtime, stripe, funds=cap * 2) for stripe in (4, 5, 6)]

        async def request(owner: UUID) -> bool:
            try:
                async with runtime.db.session() as session:
                    await wallet_service.request_withdrawal(session, runtime, owner, amount=step)
                    await session.commit()
            except WithdrawalLimitReached:
                return False
            return True

        granted = await asyncio.gather(*(request(owner) for owner in owners for _ in range(6)))
        for index, owner in enumerate(owners):
            assert sum(granted[index * 6 : index * 6 + 6]) == 4, owner
        await assert_invariants(runtime)


class TestDecisions:
    async def test_approval_posts_into_and_empties_the_reservations_stripe(
        self, runtime: Runtime
    ) -> None:
        owner = await partner_on(runtime, 7)
        before = await stripe_row(runtime, SystemAccount.holds, 7)
        async with runtime.db.session() as session:
            withdrawal = await wallet_service.request_withdrawal(
                session, runtime, owner, amount=5_000
            )
            await session.commit()
        assert (await stripe_row(runtime, SystemAccount.holds, 7))[1] == before[1] + 5_000
        async with runtime.db.session() as session:
            payouts = await ledger.system_account(session, SystemAccount.payouts, currency="USD")
            owed = (await ledger.balance(session, payouts)).balance
            await wallet_service.decide(session, runtime, uuid4(), withdrawal.id, approve=True)
            await session.commit()
        assert await stripe_row(runtime, SystemAccount.holds, 7) == before
        async with runtime.db.session() as session:
            assert (await ledger.balance(session, payouts)).balance == owed + 5_000
        await assert_invariants(runtime)

    async def test_rejection_releases_the_reservation_from_its_stripe(
        self, runtime: Runtime
    ) -> None:
        owner = await partner_on(runtime, 8)
        before = await stripe_row(runtime, SystemAccount.holds, 8)
        async with runtime.db.session() as session:
            withdrawal = await wallet_service.request_withdrawal(
                session, runtime, owner, amount=5_000
            )
            await session.commit()
        async with runtime.db.session() as session:
            await wallet_service.decide(session, runtime, uuid4(), withdrawal.id, approve=False)
            await session.commit()
        assert await stripe_row(runtime, SystemAccount.holds, 8) == before
        async with runtime.db.session() as session:
            balance = await wallet_service.balance(session, runtime, owner)
        assert balance is not None
        assert (balance.balance, balance.pending_out) == (100_000, 0)
        await assert_invariants(runtime)

    async def test_the_stripe_is_read_from_the_reservation_not_recomputed(
        self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Requested with 32 stripes, approved after the figure changed (a deploy): the
        approval still empties the stripe the reservation credited, which stays ≥ 0."""
        owner = await partner_on(runtime, 9)
        before = await stripe_row(runtime, SystemAccount.holds, 9)
        async with runtime.db.session() as session:
            first = await wallet_service.request_withdrawal(session, runtime, owner, amount=1_000)
            second = await wallet_service.request_withdrawal(session, runtime, owner, amount=2_000)
            await session.commit()
        monkeypatch.setitem(accounts.STRIPES, SystemAccount.holds, 4)  # owner now on stripe 1
        async with runtime.db.session() as session:
            await wallet_service.decide(session, runtime, uuid4(), first.id, approve=True)
            await session.commit()
        async with runtime.db.session() as session:
            decided = await wallet_service.batch_approve(session, runtime, uuid4(), [second.id])
            await session.commit()
        assert [item.ok for item in decided] == [True]
        assert await stripe_row(runtime, SystemAccount.holds, 9) == before
        monkeypatch.undo()  # the invariants know the deployed figure: rows up to 31 exist
        await assert_invariants(runtime)


class TestTopups:
    async def test_an_open_credit_does_not_hold_back_another_owners(self, runtime: Runtime) -> None:
        first_owner = owner_on(SystemAccount.payments, 10)
        second_owner = owner_on(SystemAccount.payments, 11)
        async with runtime.db.session() as first:
            await funds_service.credit(
                first, first_owner, amount=1_500, currency="USD", key=f"payment:{uuid4()}",
                kind="topup",
            )  # fmt: skip
            async with runtime.db.session() as second:
                await fail_instead_of_waiting(second)
                posted = await funds_service.credit(
                    second, second_owner, amount=2_500, currency="USD",
                    key=f"payment:{uuid4()}", kind="topup",
                )  # fmt: skip
                await second.commit()
            await first.commit()
        assert posted.created
        await assert_invariants(runtime)

    async def test_credit_and_reversal_use_the_owners_stripe_and_debt_still_works(
        self, runtime: Runtime
    ) -> None:
        """A reversal larger than what is left: the shortfall becomes debt (ADR 0042), the
        owner's payments stripe ends where it started."""
        owner = owner_on(SystemAccount.payments, 12)
        key = f"payment:{uuid4()}"
        before = await stripe_row(runtime, SystemAccount.payments, 12)
        async with runtime.db.session() as session:
            await funds_service.credit(
                session, owner, amount=3_000, currency="USD", key=key, kind="topup"
            )
            await funds_service.reserve(
                session, owner, amount=1_000, currency="USD", key=f"{key}:op", kind="operation"
            )
            await session.commit()
        assert (await stripe_row(runtime, SystemAccount.payments, 12))[0] == before[0] - 3_000
        async with runtime.db.session() as session:
            await funds_service.reverse(
                session, owner, amount=3_000, currency="USD", key=f"{key}:refund", kind="refund"
            )
            await session.commit()
        assert await stripe_row(runtime, SystemAccount.payments, 12) == before
        async with runtime.db.session() as session:
            wallet = await ledger.wallet_of(session, owner, currency="USD")
            assert wallet is not None
            assert (await ledger.balance(session, wallet)).debt == 1_000
        await assert_invariants(runtime)


class TestReports:
    async def test_system_balances_sum_the_stripes(self, runtime: Runtime) -> None:
        async def payments() -> dict[str, int]:
            async with runtime.db.session() as session:
                rows = await wallet_service.system_balances(session)
            (row,) = (r for r in rows if (r["code"], r["currency"]) == ("payments", "USD"))
            return row

        before = await payments()
        async with runtime.db.session() as session:
            for stripe, amount in ((13, 700), (14, 1_100)):
                await funds_service.credit(
                    session, owner_on(SystemAccount.payments, stripe), amount=amount,
                    currency="USD", key=f"payment:{uuid4()}", kind="topup",
                )  # fmt: skip
            await session.commit()
        after = await payments()
        assert after["balance"] == before["balance"] - 1_800
        assert 2 <= after["stripes"] <= STRIPES[SystemAccount.payments]
        assert after["smallest"] <= after["balance"] // after["stripes"] <= after["largest"]

    async def test_a_row_beyond_its_accounts_stripes_is_an_invariant_violation(
        self, runtime: Runtime
    ) -> None:
        async with runtime.db.session() as session:
            for code, stripe in (("receivables", 1), ("holds", STRIPES[SystemAccount.holds])):
                await session.execute(
                    text(
                        "INSERT INTO wallet_accounts (code, currency, guarded, stripe) "
                        "VALUES (:c, 'USD', true, :s)"
                    ),
                    {"c": code, "s": stripe},
                )
            problems = await ledger.check_invariants(session)
            await session.rollback()
        assert sum("is on stripe" in problem for problem in problems) == 2, problems
