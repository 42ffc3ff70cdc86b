"""Pending credits (ADR 0065): a unit of work crediting an account whose row another
transaction holds does not wait for it. The credit is recorded as pending with the transfer
and posted after the commit, each with its exact balance before/after, exactly once; what a
crash leaves pending is posted by the sweeper; the invariant checker counts pending credits.

Contention is made deterministic by holding the credited row's lock in a connection of the
test's own (``held``), never by timing."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from uuid import uuid4

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from surge.kit.jobs import JobContext
from surge.kit.jobs.registry import get_spec
from surge.kit.runtime import Runtime
from surge.wallet.accounts import SystemAccount
from surge.wallet.jobs import sweep_pending_credits
from surge.wallet.ledger import InsufficientFunds, InvalidTransfer, Posted, ledger
from tests.wallet.factories import create_partner, fund


async def wallets(runtime: Runtime, count: int, amount: int = 10_000) -> list[int]:
    async with runtime.db.session() as session:
        ids = []
        for _ in range(count):
            owner = await create_partner(session, runtime)
            await fund(session, owner, amount)
            ids.append(await ledger.open_wallet(session, owner, currency="USD"))
        return ids


@asynccontextmanager
async def held(runtime: Runtime, account_id: int) -> AsyncIterator[AsyncConnection]:
    """``account_id``'s row locked by another transaction until the block ends."""
    async with runtime.db.primary.connect() as connection:
        await connection.execute(
            text("SELECT 1 FROM wallet_accounts WHERE id = :id FOR NO KEY UPDATE"),
            {"id": account_id},
        )
        try:
            yield connection
        finally:
            await connection.rollback()


async def state(runtime: Runtime, account_id: int) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(balance, pending credits, entries as (amount, before, after) in id order)."""
    async with runtime.db.session() as session:
        balance = (
            await session.execute(
                text("SELECT balance FROM wallet_accounts WHERE id = :id"), {"id": account_id}
            )
        ).scalar_one()
        pending = (
            await session.execute(
                text("SELECT count(*) FROM wallet_pending_credits WHERE account_id = :id"),
                {"id": account_id},
            )
        ).scalar_one()
        entries = (
            await session.execute(
                text(
                    "SELECT amount, balance_before, balance_after FROM wallet_entries "
                    "WHERE account_id = :id ORDER BY id"
                ),
                {"id": account_id},
            )
        ).all()
    return int(balance), int(pending), [(int(a), int(b), int(c)) for a, b, c in entries]


def assert_chained(entries: list[tuple[int, int, int]], balance: int) -> None:
    """Each entry starts where the previous one ended, and the last ends at the balance."""
    for (_, _, after), (_, before, _) in itertools.pairwise(entries):
        assert before == after
    assert entries[-1][2] == balance


async def assert_invariants(runtime: Runtime) -> None:
    async with runtime.db.session() as session:
        assert await ledger.check_invariants(session) == []


async def deferring(runtime: Runtime, debit: int, credit: int, amount: int, key: str) -> Posted:
    async with runtime.db.session() as session:
        return await ledger.transfer(
            session, key=key, debit=debit, credit=credit, amount=amount, currency="USD",
            kind="transfer", defer_contended_credit=True,
        )  # fmt: skip


class TestUncontended:
    async def test_a_free_row_is_credited_at_once_as_before(self, runtime: Runtime) -> None:
        a, b = await wallets(runtime, 2)
        posted = await deferring(runtime, a, b, 2_500, f"t:{uuid4()}")
        assert posted == Posted(posted.transfer_id, True, 7_500, 12_500)
        balance, pending, entries = await state(runtime, b)
        assert (balance, pending, entries[-1]) == (12_500, 0, (2_500, 10_000, 12_500))
        await assert_invariants(runtime)

    async def test_a_row_this_unit_of_work_holds_is_not_contended(self, runtime: Runtime) -> None:
        a, b = await wallets(runtime, 2)
        async with runtime.db.session() as session:
            await ledger.lock(session, [a, b])
            posted = await ledger.transfer(
                session, key=f"t:{uuid4()}", debit=a, credit=b, amount=100, currency="USD",
                kind="transfer", defer_contended_credit=True,
            )  # fmt: skip
        assert posted.credit_balance == 10_100
        await assert_invariants(runtime)


class TestContended:
    async def test_a_held_row_makes_the_credit_pending_then_posted_exactly(
        self, runtime: Runtime
    ) -> None:
        a, b = await wallets(runtime, 2)
        async with held(runtime, b):
            posted = await deferring(runtime, a, b, 2_500, f"t:{uuid4()}")
            assert posted.credit_pending
            assert posted.debit_balance == 7_500
            # Committed: the debit is visible, the credit is pending, the books balance.
            assert (await state(runtime, b))[:2] == (10_000, 1)
            assert (await state(runtime, a))[0] == 7_500
            await assert_invariants(runtime)
        await ledger.posting_idle(runtime.db.primary)
        balance, pending, entries = await state(runtime, b)
        assert (balance, pending, entries[-1]) == (12_500, 0, (2_500, 10_000, 12_500))
        await assert_invariants(runtime)

    async def test_many_pending_credits_post_in_order_with_exact_balances(
        self, runtime: Runtime
    ) -> None:
        (hot, *payers) = await wallets(runtime, 6)
        async with held(runtime, hot):
            for n, payer in enumerate(payers, start=1):
                posted = await deferring(runtime, payer, hot, n * 100, f"t:{uuid4()}")
                assert posted.credit_pending
        await ledger.posting_idle(runtime.db.primary)
        balance, pending, entries = await state(runtime, hot)
        assert (balance, pending) == (10_000 + 1_500, 0)
        assert [e[0] for e in entries[-5:]] == [100, 200, 300, 400, 500]
        assert_chained(entries, balance)
        await assert_invariants(runtime)

    async def test_a_replayed_key_has_one_effect_and_says_pending(self, runtime: Runtime) -> None:
        a, b = await wallets(runtime, 2)
        key = f"t:{uuid4()}"
        async with held(runtime, b):
            first = await deferring(runtime, a, b, 1_000, key)
            again = await deferring(runtime, a, b, 1_000, key)
            assert again.transfer_id == first.transfer_id
            assert not again.created
            assert again.credit_pending
        await ledger.posting_idle(runtime.db.primary)
        # Posting again finds nothing: the row went with its entry.
        assert await ledger.post_pending_credits(runtime.db.primary, b) == 0
        last = await deferring(runtime, a, b, 1_000, key)
        assert not last.created
        assert last.credit_balance == 11_000
        assert (await state(runtime, a))[0] == 9_000
        balance, pending, entries = await state(runtime, b)
        assert (balance, pending, len(entries)) == (11_000, 0, 2)  # funding + this credit
        await assert_invariants(runtime)

    async def test_a_rolled_back_unit_of_work_leaves_no_pending_credit(
        self, runtime: Runtime
    ) -> None:
        a, b = await wallets(runtime, 2)
        async with held(runtime, b):

            async def failing() -> None:
                async with runtime.db.session() as session:
                    posted = await ledger.transfer(
                        session, key=f"t:{uuid4()}", debit=a, credit=b, amount=100,
                        currency="USD", kind="transfer", defer_contended_credit=True,
                    )  # fmt: skip
                    assert posted.credit_pending
                    raise RuntimeError("the unit of work fails after the transfer")

            with pytest.raises(RuntimeError):
                await failing()
        await ledger.posting_idle(runtime.db.primary)
        assert (await state(runtime, a))[0] == 10_000
        assert (await state(runtime, b))[:2] == (10_000, 0)
        await assert_invariants(runtime)


class TestDebitsAndRules:
    async def test_a_debit_of_a_held_row_waits_never_goes_pending(self, runtime: Runtime) -> None:
        a, b = await wallets(runtime, 2)
        async with held(runtime, a):

            async def debit_held() -> None:
                async with runtime.db.session() as session:
                    await session.execute(text("SET LOCAL lock_timeout = '50ms'"))
                    await ledger.transfer(
                        session, key=f"t:{uuid4()}", debit=a, credit=b, amount=100,
                        currency="USD", kind="transfer", defer_contended_credit=True,
                    )  # fmt: skip

            with pytest.raises(DBAPIError) as caught:
                await debit_held()
            assert getattr(caught.value.orig, "sqlstate", None) == "55P03"  # lock_not_available
        await assert_invariants(runtime)

    async def test_funds_are_checked_on_the_debit_when_the_credit_is_pending(
        self, runtime: Runtime
    ) -> None:
        a, b = await wallets(runtime, 2)
        async with held(runtime, b):
            with pytest.raises(InsufficientFunds):
                await deferring(runtime, a, b, 10_001, f"t:{uuid4()}")
        await ledger.posting_idle(runtime.db.primary)
        assert (await state(runtime, b))[:2] == (10_000, 0)
        await assert_invariants(runtime)

    async def test_a_reservation_cannot_defer(self, runtime: Runtime) -> None:
        a, b = await wallets(runtime, 2)
        async with runtime.db.session() as session:
            with pytest.raises(InvalidTransfer):
                await ledger.transfer(
                    session, key=f"t:{uuid4()}", debit=a, credit=b, amount=100, currency="USD",
                    kind="transfer", pending=True, defer_contended_credit=True,
                )  # fmt: skip

    async def test_a_pending_top_up_keeps_the_running_totals(self, runtime: Runtime) -> None:
        (wallet,) = await wallets(runtime, 1)
        async with runtime.db.session() as session:
            payments = await ledger.system_account(session, SystemAccount.payments, currency="USD")
        async with held(runtime, wallet):
            posted = await deferring(runtime, payments, wallet, 700, f"t:{uuid4()}")
            assert posted.credit_pending
            await assert_invariants(runtime)
        await ledger.posting_idle(runtime.db.primary)
        async with runtime.db.session() as session:
            row = (
                await session.execute(
                    text("SELECT topup_net, topup_unspent FROM wallet_accounts WHERE id = :id"),
                    {"id": wallet},
                )
            ).one()
        assert tuple(row) == (700, 700)
        await assert_invariants(runtime)


class TestLockOrder:
    async def test_a_credit_row_held_for_update_is_waited_for_in_id_order(
        self, runtime: Runtime
    ) -> None:
        """Another transaction holds the credited row FOR UPDATE (``ledger.lock``) and then
        wants the debited one. The deferring transfer must not hold the debit while it
        waits behind that lock (the transfer's foreign key waits there): the lower id,
        the credited row, is waited for first, as every ledger function orders its locks."""
        hot, payer = await wallets(runtime, 2)
        assert hot < payer
        async with runtime.db.primary.connect() as other:
            await other.execute(
                text("SELECT 1 FROM wallet_accounts WHERE id = :id FOR UPDATE"), {"id": hot}
            )
            transfer = asyncio.create_task(deferring(runtime, payer, hot, 100, f"t:{uuid4()}"))
            await waiting_for_a_lock(runtime, other)
            await other.execute(text("SET LOCAL lock_timeout = '5s'"))
            await other.execute(  # deadlocked here (40P01) if the transfer held the payer
                text("SELECT 1 FROM wallet_accounts WHERE id = :id FOR UPDATE"), {"id": payer}
            )
            await other.commit()
        posted = await transfer
        assert posted.credit_pending
        await ledger.posting_idle(runtime.db.primary)
        assert (await state(runtime, hot))[:2] == (10_100, 0)
        await assert_invariants(runtime)


async def waiting_for_a_lock(runtime: Runtime, blocker: AsyncConnection) -> None:
    """Until some backend waits for a lock ``blocker``'s backend holds (a readiness
    condition read from the server, polled: the wait has no event of its own)."""
    pid = (await blocker.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    async with runtime.db.primary.connect() as probe:
        for _ in range(1_000):
            blocked = (
                await probe.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE :pid = ANY(pg_blocking_pids(pid))"
                    ),
                    {"pid": pid},
                )
            ).scalar_one()
            await probe.rollback()
            if blocked:
                return
            await asyncio.sleep(0.005)
    raise AssertionError("nothing waited for the blocker's lock")


class TestCrash:
    async def test_a_crash_before_posting_is_recovered_by_the_sweeper(
        self, runtime: Runtime
    ) -> None:
        a, b = await wallets(runtime, 2)
        async with held(runtime, b):
            # The process "dies" after the commit: the function called without the ledger's
            # after-commit posting, as a unit of work would leave it.
            async with runtime.db.session() as session:
                (credit,) = (
                    await session.execute(
                        text(
                            "SELECT credit_balance FROM wallet_transfer_deferring("
                            ":k, :d, :c, 900, 'USD', 'transfer', NULL)"
                        ),
                        {"k": f"t:{uuid4()}", "d": a, "c": b},
                    )
                ).one()
            assert credit is None
        assert (await state(runtime, b))[:2] == (10_000, 1)
        await assert_invariants(runtime)  # the books balance with the credit pending
        # The sweeper job, as the worker's cron runs it every minute.
        spec = get_spec("wallet.pending_credits.sweep")
        assert spec is not None
        slot = datetime(2026, 12, 7, 3, 0, 30, tzinfo=UTC)
        assert spec.next_run(slot) == datetime(2026, 12, 7, 3, 1, tzinfo=UTC)  # every minute
        async with runtime.db.session() as session:
            ctx = JobContext(
                id=1, name=spec.name, queue=spec.queue, payload={}, attempt=1, token=1,
                stalls=0, runtime=runtime, session_factory=lambda: session,
            )  # fmt: skip
            await sweep_pending_credits(ctx)
        assert await ledger.sweep_pending_credits(runtime.db.primary) == 0  # never twice
        balance, pending, entries = await state(runtime, b)
        assert (balance, pending, entries[-1]) == (10_900, 0, (900, 10_000, 10_900))
        await assert_invariants(runtime)

    async def test_the_checker_sees_a_lost_pending_credit(self, runtime: Runtime) -> None:
        """The checker must be able to fail: a pending row deleted without posting."""
        a, b = await wallets(runtime, 2)
        await deferring(runtime, a, b, 300, f"t:{uuid4()}")
        await ledger.posting_idle(runtime.db.primary)
        async with runtime.db.session() as session:
            await session.execute(
                text(
                    "INSERT INTO wallet_pending_credits (account_id, transfer_id, "
                    "counterparty_account_id, amount, currency, kind) "
                    "SELECT :b, id, :a, 1, 'USD', 'transfer' FROM wallet_transfers "
                    "WHERE debit_account_id = :a ORDER BY id DESC LIMIT 1"
                ),
                {"a": a, "b": b},
            )
            problems = await ledger.check_invariants(session)
            await session.rollback()
        assert any("sum of balances" in p for p in problems)
        assert any("pending credit" in p for p in problems)


class TestHotLoad:
    async def test_invariants_hold_under_a_concurrent_hot_load(self, runtime: Runtime) -> None:
        (hot, *payers) = await wallets(runtime, 9, amount=1_000_000)
        rng = random.Random(17)
        amounts = [[rng.randint(1, 1_000) for _ in range(12)] for _ in range(16)]

        async def client(index: int) -> None:
            for n, amount in enumerate(amounts[index][1:], start=1):
                await deferring(runtime, payers[index % len(payers)], hot, amount,
                                f"hot:{index}:{n}:{uuid4()}")  # fmt: skip

        async with held(runtime, hot):  # the first round all find the row held
            first = await asyncio.gather(
                *(deferring(runtime, payers[i % len(payers)], hot, amounts[i][0],
                            f"hot:{i}:0:{uuid4()}") for i in range(16))
            )  # fmt: skip
            assert all(posted.credit_pending for posted in first)
        await asyncio.gather(*(client(i) for i in range(16)))
        await ledger.posting_idle(runtime.db.primary)
        await ledger.sweep_pending_credits(runtime.db.primary)
        balance, pending, entries = await state(runtime, hot)
        assert (balance, pending) == (1_000_000 + sum(map(sum, amounts)), 0)
        assert len(entries) == 1 + 16 * 12
        assert_chained(entries, balance)
        await assert_invariants(runtime)
