"""The ledger core on real PostgreSQL: transfers, two-phase reservations, the database's own
guards, lock ordering, partitions — and the invariants of docs/architecture.md §6 after each."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest
from sqlalchemy import pool, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from surge.kit.db import migrate
from surge.kit.runtime import Runtime
from surge.wallet.accounts import SystemAccount
from surge.wallet.ledger import (
    AlreadyResolved,
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidTransfer,
    Ledger,
    Posted,
    TransferSpec,
    ledger,
)
from tests.fixtures.migration_db import scratch_database
from tests.wallet.factories import create_partner, fund


async def assert_invariants(runtime: Runtime) -> None:
    async with runtime.db.session() as session:
        assert await ledger.check_invariants(session) == []


async def two_wallets(runtime: Runtime, amount: int = 10_000) -> tuple[int, int]:
    async with runtime.db.session() as session:
        a, b = await create_partner(session, runtime), await create_partner(session, runtime)
        await fund(session, a, amount)
        await fund(session, b, amount)
        return (
            await ledger.open_wallet(session, a, currency="USD"),
            await ledger.open_wallet(session, b, currency="USD"),
        )


class TestTransfer:
    async def test_moves_both_balances_and_records_before_after(self, runtime: Runtime) -> None:
        a, b = await two_wallets(runtime)
        async with runtime.db.session() as session:
            posted = await ledger.transfer(
                session, key=f"t:{uuid4()}", debit=a, credit=b, amount=2_500,
                currency="USD", kind="transfer",
            )  # fmt: skip
            entries = (
                await session.execute(
                    text(
                        "SELECT account_id, amount, balance_before, balance_after "
                        "FROM wallet_entries WHERE transfer_id = :t ORDER BY amount"
                    ),
                    {"t": posted.transfer_id},
                )
            ).all()
        assert posted.created
        assert (posted.debit_balance, posted.credit_balance) == (7_500, 12_500)
        assert [tuple(e) for e in entries] == [
            (a, -2_500, 10_000, 7_500),
            (b, 2_500, 10_000, 12_500),
        ]
        await assert_invariants(runtime)

    async def test_replayed_key_has_one_effect(self, runtime: Runtime) -> None:
        a, b = await two_wallets(runtime)
        key = f"t:{uuid4()}"
        for _ in range(3):
            async with runtime.db.session() as session:
                last = await ledger.transfer(
                    session, key=key, debit=a, credit=b, amount=1_000, currency="USD", kind="t"
                )
        assert not last.created
        async with runtime.db.session() as session:
            assert (await ledger.balance(session, a)).balance == 9_000
        await assert_invariants(runtime)

    async def test_key_reused_for_another_transfer_is_refused(self, runtime: Runtime) -> None:
        a, b = await two_wallets(runtime)
        key = f"t:{uuid4()}"
        async with runtime.db.session() as session:
            await ledger.transfer(
                session, key=key, debit=a, credit=b, amount=1_000, currency="USD", kind="t"
            )
        with pytest.raises(IdempotencyKeyReused):
            async with runtime.db.session() as session:
                await ledger.transfer(
                    session, key=key, debit=a, credit=b, amount=999, currency="USD", kind="t"
                )
        await assert_invariants(runtime)

    async def test_overdraft_is_refused_and_nothing_moves(self, runtime: Runtime) -> None:
        a, b = await two_wallets(runtime, amount=500)
        with pytest.raises(InsufficientFunds):
            async with runtime.db.session() as session:
                await ledger.transfer(
                    session,
                    key=f"t:{uuid4()}",
                    debit=a,
                    credit=b,
                    amount=501,
                    currency="USD",
                    kind="t",
                )
        async with runtime.db.session() as session:
            assert (await ledger.balance(session, a)).balance == 500
        await assert_invariants(runtime)

    async def test_database_refuses_a_negative_wallet_even_without_the_ledger(
        self, runtime: Runtime
    ) -> None:
        a, _ = await two_wallets(runtime, amount=500)
        with pytest.raises(DBAPIError, match="ck_wallet_accounts_non_negative"):
            async with runtime.db.session() as session:
                await session.execute(
                    text("UPDATE wallet_accounts SET balance = -1 WHERE id = :a"), {"a": a}
                )

    async def test_transfers_and_entries_are_append_only(self, runtime: Runtime) -> None:
        _a, b = await two_wallets(runtime)
        for statement in (
            "UPDATE wallet_transfers SET amount = 1 WHERE credit_account_id = :b",
            "DELETE FROM wallet_entries WHERE account_id = :b",
        ):
            with pytest.raises(DBAPIError, match="append-only"):
                async with runtime.db.session() as session:
                    await session.execute(text(statement), {"b": b})

    async def test_shape_errors(self, runtime: Runtime) -> None:
        a, _ = await two_wallets(runtime)
        # Each refusal fails its own unit of work: a failed statement aborts the transaction,
        # and a unit of work carried on past it fails at COMMIT (ADR 0059).
        with pytest.raises(InvalidTransfer):
            async with runtime.db.session() as session:
                await ledger.transfer(
                    session, key="x", debit=a, credit=a, amount=1, currency="USD", kind="t"
                )
        with pytest.raises(InvalidTransfer):
            async with runtime.db.session() as session:
                await ledger.transfer(
                    session, key="y", debit=a, credit=a + 1, amount=0, currency="USD", kind="t"
                )


class TestStandalone:
    async def test_transfer_now_is_atomic_idempotent_and_guarded(self, runtime: Runtime) -> None:
        a, b = await two_wallets(runtime, amount=1_000)
        key = f"now:{uuid4()}"
        for _ in range(2):
            posted = await ledger.transfer_now(
                runtime.db.primary, key=key, debit=a, credit=b, amount=400,
                currency="USD", kind="t",
            )  # fmt: skip
        assert not posted.created
        assert posted.debit_balance == 600
        with pytest.raises(InsufficientFunds):
            await ledger.transfer_now(
                runtime.db.primary, key=f"now:{uuid4()}", debit=a, credit=b, amount=601,
                currency="USD", kind="t",
            )  # fmt: skip
        async with runtime.db.session() as session:
            assert (await ledger.balance(session, a)).balance == 600
        await assert_invariants(runtime)

    async def test_concurrent_transfers_are_coalesced_each_with_its_own_answer(
        self, runtime: Runtime
    ) -> None:
        """32 standalone transfers at once to one hot wallet go in one batch (one
        transaction: the rows share their xmin); one refused for funds and one reusing a key
        for another transfer fail the batch, which is then run transfer by transfer: each
        caller gets its own result or error, and the history stays exact."""
        hot, poor = await two_wallets(runtime, amount=1_000)
        payers = [(await two_wallets(runtime, amount=1_000))[0] for _ in range(15)]
        run = uuid4().hex[:8]
        reused = f"c:{run}:reused"
        await ledger.transfer_now(
            runtime.db.primary, key=reused, debit=payers[0], credit=hot, amount=1,
            currency="USD", kind="t",
        )  # fmt: skip

        async def send(n: int) -> object:
            return await ledger.transfer_now(
                runtime.db.primary, key=f"c:{run}:{n}", debit=payers[n % 15], credit=hot,
                amount=10, currency="USD", kind="t",
            )  # fmt: skip

        async def one_batch(count: int) -> list[object]:
            return await asyncio.gather(*(send(n) for n in range(count)), return_exceptions=True)

        results = await one_batch(32)
        assert all(not isinstance(r, BaseException) for r in results)
        async with runtime.db.session() as session:
            transactions = await session.scalar(
                text(
                    "SELECT count(DISTINCT xmin::text) FROM wallet_transfers WHERE idempotency_key LIKE :k"
                ),
                {"k": f"c:{run}:%"},
            )
            assert transactions == 2  # the first transfer alone, then one batch of 32
            assert (await ledger.balance(session, hot)).balance == 1_000 + 1 + 32 * 10

        async def refused() -> object:
            return await ledger.transfer_now(
                runtime.db.primary, key=f"c:{run}:poor", debit=poor, credit=hot, amount=5_000,
                currency="USD", kind="t",
            )  # fmt: skip

        async def key_reused() -> object:
            return await ledger.transfer_now(
                runtime.db.primary, key=reused, debit=payers[1], credit=hot, amount=2,
                currency="USD", kind="t",
            )  # fmt: skip

        mixed = await asyncio.gather(
            *(send(n) for n in range(100, 110)), refused(), key_reused(), send(110),
            return_exceptions=True,
        )  # fmt: skip
        assert isinstance(mixed[10], InsufficientFunds)
        assert isinstance(mixed[11], IdempotencyKeyReused)
        good = [r for n in (*range(10), 12) if isinstance(r := mixed[n], Posted) and r.created]
        assert len(good) == 11
        # Credited one after the other: each sees the balance the previous one left.
        credits = sorted(r.credit_balance or 0 for r in good)
        assert credits == [1_000 + 1 + 32 * 10 + 10 * (n + 1) for n in range(11)]
        await assert_invariants(runtime)


class TestMany:
    async def test_transfer_many_in_one_statement_keeps_keys_and_order(
        self, runtime: Runtime
    ) -> None:
        a, b = await two_wallets(runtime)
        keys = [f"m:{uuid4()}" for _ in range(3)]
        async with runtime.db.session() as session:
            await ledger.transfer(
                session, key=keys[1], debit=a, credit=b, amount=20, currency="USD", kind="t"
            )
        async with runtime.db.session() as session:
            posted = await ledger.transfer_many(
                session,
                [
                    TransferSpec(keys[0], a, b, 10, "USD", "t"),
                    TransferSpec(keys[1], a, b, 20, "USD", "t"),  # already done: replayed
                    TransferSpec(keys[2], b, a, 30, "USD", "t", "ref"),
                ],
            )
        assert [p.created for p in posted] == [True, False, True]
        async with runtime.db.session() as session:
            assert (await ledger.balance(session, a)).balance == 10_000 - 10 - 20 + 30
        with pytest.raises(InsufficientFunds):  # one refused transfer refuses the statement
            async with runtime.db.session() as session:
                await ledger.transfer_many(
                    session,
                    [
                        TransferSpec(f"m:{uuid4()}", a, b, 1, "USD", "t"),
                        TransferSpec(f"m:{uuid4()}", a, b, 10**9, "USD", "t"),
                    ],
                )
        await assert_invariants(runtime)


class TestTwoPhase:
    async def test_pending_reserves_then_post_moves(self, runtime: Runtime) -> None:
        a, b = await two_wallets(runtime)
        async with runtime.db.session() as session:
            pending = await ledger.transfer(
                session, key=f"p:{uuid4()}", debit=a, credit=b, amount=4_000,
                currency="USD", kind="hold", pending=True,
            )  # fmt: skip
            held = await ledger.balance(session, a)
        assert (held.balance, held.available) == (10_000, 6_000)
        # The reservation counts against availability: a second one past it is refused.
        with pytest.raises(InsufficientFunds):
            async with runtime.db.session() as session:
                await ledger.transfer(
                    session, key=f"p:{uuid4()}", debit=a, credit=b, amount=6_001,
                    currency="USD", kind="hold", pending=True,
                )  # fmt: skip
        key = f"post:{uuid4()}"
        async with runtime.db.session() as session:
            await ledger.post(session, key=key, pending_id=pending.transfer_id, kind="hold")
        async with runtime.db.session() as session:  # same key again: replay, no effect
            again = await ledger.post(session, key=key, pending_id=pending.transfer_id, kind="hold")
            after = await ledger.balance(session, a)
        assert not again.created
        assert (after.balance, after.available, after.pending_out) == (6_000, 6_000, 0)
        with pytest.raises(AlreadyResolved):
            async with runtime.db.session() as session:
                await ledger.void(
                    session, key=f"v:{uuid4()}", pending_id=pending.transfer_id, kind="hold"
                )
        await assert_invariants(runtime)

    async def test_void_releases_the_reservation(self, runtime: Runtime) -> None:
        a, b = await two_wallets(runtime)
        async with runtime.db.session() as session:
            pending = await ledger.transfer(
                session, key=f"p:{uuid4()}", debit=a, credit=b, amount=4_000,
                currency="USD", kind="hold", pending=True,
            )  # fmt: skip
            await ledger.void(
                session, key=f"v:{uuid4()}", pending_id=pending.transfer_id, kind="hold"
            )
            after = await ledger.balance(session, a)
        assert (after.balance, after.available) == (10_000, 10_000)
        await assert_invariants(runtime)


class TestLockOrder:
    async def test_opposite_transfers_on_one_pair_never_deadlock(self, runtime: Runtime) -> None:
        """A→B and B→A at once: without the id-ordered locks PostgreSQL aborts one of
        each crossing pair with a deadlock; here all 200 complete."""
        a, b = await two_wallets(runtime, amount=1_000_000)

        async def move(i: int) -> None:
            debit, credit = (a, b) if i % 2 else (b, a)
            async with runtime.db.session() as session:
                await ledger.transfer(
                    session, key=f"x:{uuid4()}", debit=debit, credit=credit, amount=1 + i,
                    currency="USD", kind="t",
                )  # fmt: skip
                await asyncio.sleep(0)  # hold the locks across a scheduling point

        await asyncio.gather(*(move(i) for i in range(200)))
        await assert_invariants(runtime)


class TestPartitions:
    async def test_upkeep_creates_future_months_and_history_lands_in_them(
        self, runtime: Runtime
    ) -> None:
        async with runtime.db.session() as session:
            await session.execute(text("SELECT wallet_ensure_partitions(14)"))
        await two_wallets(runtime)
        async with runtime.db.session() as session:
            names = set(
                (
                    await session.execute(
                        text(
                            "SELECT c.relname FROM pg_inherits i "
                            "JOIN pg_class c ON c.oid = i.inhrelid "
                            "WHERE i.inhparent = 'wallet_entries'::regclass"
                        )
                    )
                ).scalars()
            )
            month = (
                await session.execute(text("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM')"))
            ).scalar_one()
            default_rows = (
                await session.execute(text("SELECT count(*) FROM wallet_entries_default"))
            ).scalar_one()
        assert f"wallet_entries_{month}" in names
        assert len([n for n in names if n != "wallet_entries_default"]) >= 15
        assert default_rows == 0


class TestSystemAccounts:
    async def test_revenue_may_go_negative_holds_may_not(self, runtime: Runtime) -> None:
        async with runtime.db.session() as session:
            revenue = await ledger.system_account(session, SystemAccount.revenue, currency="EUR")
            holds = await ledger.system_account(session, SystemAccount.holds, currency="EUR")
            owner = await create_partner(session, runtime)
            wallet = await ledger.open_wallet(session, owner, currency="EUR")
            await ledger.transfer(
                session, key=f"e:{uuid4()}", debit=revenue, credit=wallet, amount=10,
                currency="EUR", kind="earning",
            )  # fmt: skip
        with pytest.raises(InsufficientFunds):
            async with runtime.db.session() as session:
                await ledger.transfer(
                    session, key=f"e:{uuid4()}", debit=holds, credit=wallet, amount=10,
                    currency="EUR", kind="t",
                )  # fmt: skip
        await assert_invariants(runtime)


def test_a_system_account_id_is_not_trusted_across_engines(server_urls: tuple[str, str]) -> None:
    """The per-process id cache is per engine: a database rebuilt at the same address (a
    cluster built again, a restored backup) numbers its accounts anew."""
    fresh = Ledger()

    async def revenue_id(dsn: str) -> int:
        engine = create_async_engine(dsn, poolclass=pool.NullPool)
        try:
            for _ in range(2):  # the first sight creates the row; the second caches its id
                async with AsyncSession(engine) as session, session.begin():
                    found = await fresh.system_account(
                        session, SystemAccount.revenue, currency="USD"
                    )
            return found
        finally:
            await engine.dispose()

    with scratch_database(server_urls[0], "head") as db:
        db.upgrade()
        before = asyncio.run(revenue_id(db.dsn))
        asyncio.run(db._drop())
        assert migrate.ensure_database(db.dsn)
        db.upgrade()
        db.run(  # the rebuilt database's first accounts are others
            "INSERT INTO wallet_accounts (code, currency, guarded) VALUES ('holds', 'USD', true), "
            "('payouts', 'USD', true), ('sales', 'USD', true)"
        )
        after = asyncio.run(revenue_id(db.dsn))
        assert after != before
        assert db.run(query="SELECT id FROM wallet_accounts WHERE code = 'revenue'") == [(after,)]
