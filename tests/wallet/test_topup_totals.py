"""A wallet's net top-up credit and posted purchases are running totals on its account row
(ADR 0036), moved by the ledger's functions in the posting's own transaction: every path
that posts against the payments or the sales account moves them, nothing else does, and
``check_invariants`` compares them with the entries."""

from __future__ import annotations

from uuid import UUID, uuid4

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.runtime import Runtime
from surge.wallet import repository
from surge.wallet.accounts import SystemAccount
from surge.wallet.funds import funds as funds_service
from surge.wallet.ledger import TransferSpec, ledger
from tests.fixtures.migration_db import post, scratch_database

REVISION = "0014_wallet_topup_totals"


async def totals(session: AsyncSession, owner: UUID) -> tuple[int, int]:
    wallet = await ledger.wallet_of(session, owner, currency="USD")
    assert wallet is not None
    return await repository.topup_flows(session, wallet)


async def sums(session: AsyncSession, owner: UUID) -> tuple[int, int]:
    """What the totals stand for, summed over the wallet's entries (the old scan)."""
    wallet = await ledger.wallet_of(session, owner, currency="USD")
    row = (
        await session.execute(
            text(
                "SELECT coalesce(sum(e.amount) FILTER (WHERE c.code = 'payments'), 0), "
                "  coalesce(-sum(e.amount) FILTER (WHERE c.code = 'sales'), 0) "
                "FROM wallet_entries e JOIN wallet_accounts c ON c.id = e.counterparty_account_id "
                "WHERE e.account_id = :w"
            ),
            {"w": wallet},
        )
    ).one()
    return int(row[0]), int(row[1])


async def test_every_money_path_moves_the_totals(runtime: Runtime) -> None:
    """Top-up, refund, dispute, won dispute, purchase (reserve + settle), released
    reservation, a purchase given back by sales, the coalesced standalone path and
    ``transfer_many``: after each, the totals are what the entries sum to."""
    owner, pi = uuid4(), f"pi_{uuid4().hex}"
    async with runtime.db.session() as session:
        payments = await ledger.system_account(session, SystemAccount.payments, currency="USD")
        sales = await ledger.system_account(session, SystemAccount.sales, currency="USD")
        wallet = await ledger.open_wallet(session, owner, currency="USD")
        await session.commit()

    async def step(expect: tuple[int, int]) -> None:
        async with runtime.db.session() as session:
            assert await totals(session, owner) == expect == await sums(session, owner)

    async with runtime.db.session() as session:
        await funds_service.credit(
            session, owner, amount=10_000, currency="USD", key=f"payment:{pi}", kind="topup"
        )
        await funds_service.credit(  # a replay moves nothing
            session, owner, amount=10_000, currency="USD", key=f"payment:{pi}", kind="topup"
        )
        await session.commit()
    await step((10_000, 0))
    async with runtime.db.session() as session:
        await funds_service.reverse(
            session, owner, amount=1_000, currency="USD",
            key=f"payment:{pi}:refund:re_1", kind="topup_refund",
        )  # fmt: skip
        await funds_service.reverse(
            session, owner, amount=2_000, currency="USD",
            key=f"payment:{pi}:dispute:dp_1", kind="topup_dispute",
        )  # fmt: skip
        await funds_service.credit(
            session, owner, amount=2_000, currency="USD",
            key=f"payment:{pi}:dispute:dp_1:reinstated", kind="topup_dispute_won",
        )  # fmt: skip
        await session.commit()
    await step((9_000, 0))
    async with runtime.db.session() as session:
        hold = await funds_service.reserve(
            session, owner, amount=1_500, currency="USD", key=f"op:{pi}:reserve", kind="operation"
        )
        await session.commit()
    await step((9_000, 0))  # reserved is not posted: not a purchase yet
    async with runtime.db.session() as session:
        await funds_service.settle(session, hold, key=f"op:{pi}:settle", kind="operation")
        await session.commit()
    await step((9_000, 1_500))
    async with runtime.db.session() as session:
        dropped = await funds_service.reserve(
            session, owner, amount=700, currency="USD", key=f"op:{pi}:2:reserve", kind="operation"
        )
        await funds_service.release(session, dropped, key=f"op:{pi}:2:release", kind="operation")
        await ledger.transfer(  # sales gives a purchase back
            session, key=f"op:{pi}:giveback", debit=sales, credit=wallet, amount=500,
            currency="USD", kind="operation_refund",
        )  # fmt: skip
        await session.commit()
    await step((9_000, 1_000))
    await ledger.transfer_now(
        runtime.db.primary, key=f"payment:{pi}:now", debit=payments, credit=wallet,
        amount=300, currency="USD", kind="topup",
    )  # fmt: skip
    await step((9_300, 1_000))
    async with runtime.db.session() as session:
        await ledger.transfer_many(
            session,
            [
                TransferSpec(f"op:{pi}:many:1", wallet, sales, 200, "USD", "operation"),
                TransferSpec(f"payment:{pi}:many:2", payments, wallet, 50, "USD", "topup"),
            ],
        )
        await session.commit()
    await step((9_350, 1_200))
    async with runtime.db.session() as session:
        assert await ledger.check_invariants(session) == []


async def test_a_transfer_between_ordinary_accounts_moves_no_total(runtime: Runtime) -> None:
    first, second = uuid4(), uuid4()
    async with runtime.db.session() as session:
        external = await ledger.system_account(session, SystemAccount.external, currency="USD")
        a = await ledger.open_wallet(session, first, currency="USD")
        b = await ledger.open_wallet(session, second, currency="USD")
        await ledger.transfer(
            session, key=f"seed:{uuid4()}", debit=external, credit=a, amount=900,
            currency="USD", kind="adjustment",
        )  # fmt: skip
        await ledger.transfer(
            session, key=f"p2p:{uuid4()}", debit=a, credit=b, amount=400,
            currency="USD", kind="transfer",
        )  # fmt: skip
        await session.commit()
    async with runtime.db.session() as session:
        assert await totals(session, first) == (0, 0)
        assert await totals(session, second) == (0, 0)
        rows = await session.execute(
            text("SELECT topup_net, purchases_posted FROM wallet_accounts WHERE id = :e"),
            {"e": external},
        )
        assert rows.one() == (0, 0)


async def test_the_invariant_check_sees_a_total_that_drifted(runtime: Runtime) -> None:
    """A total that no longer equals its entries (an update forgotten by some path) is
    reported; the corruption is rolled back, so other tests see a sound ledger."""
    owner = uuid4()
    async with runtime.db.session() as session:
        await funds_service.credit(
            session, owner, amount=800, currency="USD", key=f"payment:{uuid4()}", kind="topup"
        )
        await session.commit()
    async with runtime.db.session() as session:
        wallet = await ledger.wallet_of(session, owner, currency="USD")
        await session.execute(
            text(
                "UPDATE wallet_accounts SET purchases_posted = purchases_posted + 1 WHERE id = :w"
            ),
            {"w": wallet},
        )
        problems = await ledger.check_invariants(session)
        await session.rollback()
    assert problems == [f"account {wallet}: top-up/purchase/debt totals 800/1/0, entries 800/0/0"]


async def test_the_invariant_check_sees_a_debt_that_drifted(runtime: Runtime) -> None:
    """A debt that no longer equals the wallet's entries against receivables is reported
    (rule 3b), and so is the receivables balance that no longer mirrors the debts (3c)."""
    owner = uuid4()
    async with runtime.db.session() as session:
        await funds_service.credit(
            session, owner, amount=800, currency="USD", key=f"payment:{uuid4()}", kind="topup"
        )
        await session.commit()
    async with runtime.db.session() as session:
        wallet = await ledger.wallet_of(session, owner, currency="USD")
        await session.execute(
            text("UPDATE wallet_accounts SET debt = debt + 1 WHERE id = :w"), {"w": wallet}
        )
        problems = await ledger.check_invariants(session)
        await session.rollback()
    assert f"account {wallet}: top-up/purchase/debt totals 800/0/1, entries 800/0/0" in problems
    assert any(p.startswith("USD: receivables balance") for p in problems), problems


def test_the_migration_backfills_the_totals_and_goes_back_down(
    server_urls: tuple[str, str],
) -> None:
    """A database with history from before the totals: the migration sums it into them,
    and its downgrade restores the previous functions (they still post)."""
    totals_sql = (
        "SELECT id, topup_net, purchases_posted FROM wallet_accounts WHERE id > 1000 ORDER BY id"
    )
    with scratch_database(server_urls[0], REVISION) as db:
        db.upgrade(db.previous)
        # 1001 payments, 1002 sales, 1003 and 1004 wallets, 1005 external.
        db.run(
            "INSERT INTO wallet_accounts (id, owner_id, code, currency, guarded) "
            f"OVERRIDING SYSTEM VALUE VALUES (1001, NULL, 'payments', 'USD', false), "
            f"(1002, NULL, 'sales', 'USD', true), (1003, '{uuid4()}', 'wallet', 'USD', true), "
            f"(1004, '{uuid4()}', 'wallet', 'USD', true), "
            "(1005, NULL, 'external', 'USD', false)",
            post("t1", 1001, 1003, 5_000),  # top-up
            post("r1", 1003, 1001, 600),  # its refund
            post("s1", 1003, 1002, 1_200),  # a purchase
            post("g1", 1002, 1003, 200),  # given back
            post("x1", 1005, 1004, 999),  # ordinary transfers
            post("x2", 1004, 1003, 99),
        )
        db.upgrade()
        assert db.run(query=totals_sql) == [
            (1001, 0, 0), (1002, 0, 0), (1003, 4_400, 1_000), (1004, 0, 0), (1005, 0, 0),
        ]  # fmt: skip
        assert db.run(post("t2", 1001, 1004, 70), query=totals_sql)[3] == (1004, 70, 0)
        db.downgrade()
        columns = db.run(
            post("t3", 1001, 1004, 30),
            query="SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'wallet_accounts' AND column_name = 'topup_net'",
        )
        assert columns == [(0,)]
