"""``surge.wallet.funds.credit`` / ``reverse``: money in from the payment provider and back,
idempotent by the caller's key, in the caller's transaction, guarded against overdraft."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from surge.kit.runtime import Runtime
from surge.wallet.accounts import SystemAccount
from surge.wallet.funds import funds as funds_service
from surge.wallet.ledger import IdempotencyKeyReused, WalletInDebt, ledger


async def payments_balance(runtime: Runtime, owner: UUID) -> int:
    """The balance of the payments stripe ``owner``'s top-ups debit (ADR 0058)."""
    async with runtime.db.session() as session:
        account = await ledger.system_account_for(
            session, SystemAccount.payments, owner, currency="USD"
        )
        return (await ledger.balance(session, account)).balance


class TestCredit:
    async def test_same_key_moves_money_once(self, runtime: Runtime) -> None:
        owner, key = uuid4(), f"payment:pi_{uuid4().hex}"
        before = await payments_balance(runtime, owner)
        async with runtime.db.session() as session:
            first = await funds_service.credit(
                session, owner, amount=1_500, currency="USD", key=key, kind="topup"
            )
            again = await funds_service.credit(
                session, owner, amount=1_500, currency="USD", key=key, kind="topup"
            )
            await session.commit()
        async with runtime.db.session() as session:
            later = await funds_service.credit(
                session, owner, amount=1_500, currency="USD", key=key, kind="topup"
            )
            await session.commit()
        assert (first.created, again.created, later.created) == (True, False, False)
        assert first.transfer_id == again.transfer_id == later.transfer_id
        async with runtime.db.session() as session:
            assert await funds_service.available(session, owner, currency="USD") == 1_500
        # Double entry: the provider's side went down by what the wallet went up.
        assert await payments_balance(runtime, owner) == before - 1_500

    async def test_same_key_other_amount_is_refused(self, runtime: Runtime) -> None:
        owner, key = uuid4(), f"payment:pi_{uuid4().hex}"
        async with runtime.db.session() as session:
            await funds_service.credit(
                session, owner, amount=100, currency="USD", key=key, kind="topup"
            )
            await session.commit()
        with pytest.raises(IdempotencyKeyReused):
            async with runtime.db.session() as session:
                await funds_service.credit(
                    session, owner, amount=999, currency="USD", key=key, kind="topup"
                )

    async def test_rolled_back_credit_leaves_nothing(self, runtime: Runtime) -> None:
        owner, key = uuid4(), f"payment:pi_{uuid4().hex}"

        async def failing_unit_of_work() -> None:
            async with runtime.db.session() as session:
                await funds_service.credit(
                    session, owner, amount=700, currency="USD", key=key, kind="topup"
                )
                raise RuntimeError("the caller's unit of work failed")

        with pytest.raises(RuntimeError):
            await failing_unit_of_work()
        async with runtime.db.session() as session:
            assert await funds_service.available(session, owner, currency="USD") == 0
            posted = await funds_service.credit(
                session, owner, amount=700, currency="USD", key=key, kind="topup"
            )
            assert posted.created  # the key was never used: nothing happened the first time


class TestReverse:
    async def test_reverse_once_per_key(self, runtime: Runtime) -> None:
        owner, pi = uuid4(), f"pi_{uuid4().hex}"
        async with runtime.db.session() as session:
            await funds_service.credit(
                session, owner, amount=2_000, currency="USD", key=f"payment:{pi}", kind="topup"
            )
            for _ in range(2):
                await funds_service.reverse(
                    session,
                    owner,
                    amount=500,
                    currency="USD",
                    key=f"payment:{pi}:refund:re_1",
                    kind="topup_refund",
                )
            await funds_service.reverse(
                session,
                owner,
                amount=1_500,
                currency="USD",
                key=f"payment:{pi}:refund:re_2",
                kind="topup_refund",
            )
            await session.commit()
        async with runtime.db.session() as session:
            assert await funds_service.available(session, owner, currency="USD") == 0

    async def test_reverse_beyond_the_balance_is_owed(self, runtime: Runtime) -> None:
        """The provider took the 301 back: the reversal posts whole, the 1 the wallet lacks
        is advanced by receivables and owed (ADR 0042), once whatever the replays; the next
        credit repays it first and the wallet cannot spend until then."""
        owner, pi = uuid4(), f"pi_{uuid4().hex}"
        async with runtime.db.session() as session:
            await funds_service.credit(
                session, owner, amount=300, currency="USD", key=f"payment:{pi}", kind="topup"
            )
            await session.commit()
        for _ in range(2):
            async with runtime.db.session() as session:
                await funds_service.reverse(
                    session, owner, amount=301, currency="USD",
                    key=f"payment:{pi}:dispute:dp_1", kind="topup_dispute",
                )  # fmt: skip
                await session.commit()
        async with runtime.db.session() as session:
            wallet = await ledger.wallet_of(session, owner, currency="USD")
            assert wallet is not None
            seen = await ledger.balance(session, wallet)
            assert (seen.balance, seen.debt) == (0, 1)
        with pytest.raises(WalletInDebt) as info:  # its own unit of work: it fails whole
            async with runtime.db.session() as session:
                await funds_service.reserve(
                    session, owner, amount=1, currency="USD", key=f"op:{uuid4()}",
                    kind="operation",
                )  # fmt: skip
        assert info.value.status_code == 409
        async with runtime.db.session() as session:
            await funds_service.credit(
                session, owner, amount=50, currency="USD", key=f"payment:pi_{uuid4().hex}",
                kind="topup",
            )  # fmt: skip
            await session.commit()
        async with runtime.db.session() as session:
            seen = await ledger.balance(session, wallet)
            assert (seen.balance, seen.debt) == (49, 0)
            assert await funds_service.available(session, owner, currency="USD") == 49
            assert await ledger.check_invariants(session) == []
