"""``surge.wallet.funds.reserve`` / ``settle`` / ``release``: how operations hold an
owner's credit. Each call is idempotent by key, and a reservation ends exactly one way."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from surge.kit.runtime import Runtime
from surge.wallet.funds import funds
from surge.wallet.ledger import AlreadyResolved, InsufficientFunds

CUR = "USD"


async def credited(runtime: Runtime, amount: int) -> UUID:
    owner = uuid4()
    async with runtime.db.session() as session:
        await funds.credit(
            session, owner, amount=amount, currency=CUR, key=f"t:{owner}:credit", kind="topup"
        )
    return owner


class TestReserve:
    async def test_reserve_lowers_available_until_settled(self, runtime: Runtime) -> None:
        owner = await credited(runtime, 1_000)
        async with runtime.db.session() as session:
            hold = await funds.reserve(
                session, owner, amount=300, currency=CUR, key=f"t:{owner}:r", kind="operation"
            )
            assert await funds.available(session, owner, currency=CUR) == 700
            posted = await funds.settle(session, hold, key=f"t:{owner}:s", kind="operation")
            assert posted.created
        async with runtime.db.session() as session:
            assert await funds.available(session, owner, currency=CUR) == 700

    async def test_release_gives_it_back(self, runtime: Runtime) -> None:
        owner = await credited(runtime, 1_000)
        async with runtime.db.session() as session:
            hold = await funds.reserve(
                session, owner, amount=400, currency=CUR, key=f"t:{owner}:r", kind="operation"
            )
            await funds.release(session, hold, key=f"t:{owner}:v", kind="operation")
            assert await funds.available(session, owner, currency=CUR) == 1_000

    async def test_same_key_reserves_once(self, runtime: Runtime) -> None:
        owner = await credited(runtime, 1_000)
        async with runtime.db.session() as session:
            key = f"t:{owner}:r"
            first = await funds.reserve(
                session, owner, amount=250, currency=CUR, key=key, kind="op"
            )
            second = await funds.reserve(
                session, owner, amount=250, currency=CUR, key=key, kind="op"
            )
            assert first == second
            assert await funds.available(session, owner, currency=CUR) == 750

    async def test_more_than_available_is_refused(self, runtime: Runtime) -> None:
        owner = await credited(runtime, 100)
        with pytest.raises(InsufficientFunds):
            async with runtime.db.session() as session:
                await funds.reserve(
                    session, owner, amount=101, currency=CUR, key=f"t:{owner}:r", kind="op"
                )
        async with runtime.db.session() as session:
            assert await funds.available(session, owner, currency=CUR) == 100


class TestOneEnding:
    async def test_settle_twice_by_key_has_one_effect(self, runtime: Runtime) -> None:
        owner = await credited(runtime, 1_000)
        async with runtime.db.session() as session:
            hold = await funds.reserve(
                session, owner, amount=300, currency=CUR, key=f"t:{owner}:r", kind="op"
            )
            first = await funds.settle(session, hold, key=f"t:{owner}:s", kind="op")
            again = await funds.settle(session, hold, key=f"t:{owner}:s", kind="op")
            assert first.created
            assert not again.created
            assert await funds.available(session, owner, currency=CUR) == 700

    async def test_release_after_settle_is_refused(self, runtime: Runtime) -> None:
        owner = await credited(runtime, 1_000)
        async with runtime.db.session() as session:
            hold = await funds.reserve(
                session, owner, amount=300, currency=CUR, key=f"t:{owner}:r", kind="op"
            )
            await funds.settle(session, hold, key=f"t:{owner}:s", kind="op")
        with pytest.raises(AlreadyResolved):
            async with runtime.db.session() as session:
                await funds.release(session, hold, key=f"t:{owner}:v", kind="op")
        async with runtime.db.session() as session:
            assert await funds.available(session, owner, currency=CUR) == 700

    async def test_settle_after_release_is_refused(self, runtime: Runtime) -> None:
        owner = await credited(runtime, 1_000)
        async with runtime.db.session() as session:
            hold = await funds.reserve(
                session, owner, amount=300, currency=CUR, key=f"t:{owner}:r", kind="op"
            )
            await funds.release(session, hold, key=f"t:{owner}:v", kind="op")
        with pytest.raises(AlreadyResolved):
            async with runtime.db.session() as session:
                await funds.settle(session, hold, key=f"t:{owner}:s", kind="op")
        async with runtime.db.session() as session:
            assert await funds.available(session, owner, currency=CUR) == 1_000
