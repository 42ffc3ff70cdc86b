"""1 000 concurrent mixed operations on ONE wallet (credits, withdrawal requests, approvals,
rejections, retried idempotent requests) on real PostgreSQL; afterwards the invariants of
docs/architecture.md §6 hold and the wallet shows exactly what the successful operations add up to."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import orjson
import pytest
from sqlalchemy import text
from starlette.responses import Response

from surge.config import Settings
from surge.kit.errors import SurgeError
from surge.kit.runtime import Runtime
from surge.kit.web.idempotency import fingerprint, idempotency_keys
from surge.wallet.accounts import SystemAccount
from surge.wallet.ledger import ledger
from surge.wallet.service import wallet as wallet_service
from tests.fixtures.settings import make_settings
from tests.wallet.factories import create_partner

OPERATIONS = 1_000


@pytest.fixture
async def busy_runtime(server_urls: tuple[str, str]) -> AsyncIterator[Runtime]:
    # 1 000 tasks queue for 20 connections; the default 5 s checkout wait is for requests,
    # not for a deliberate pile-up, so this runtime waits as long as the test needs.
    settings: Settings = make_settings(*server_urls, DB_POOL_TIMEOUT=120)
    runtime = Runtime(settings)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def test_thousand_mixed_operations_on_one_wallet_keep_the_invariants(
    busy_runtime: Runtime,
) -> None:
    db = busy_runtime.db
    rng = random.Random(8)
    async with db.session() as session:
        owner = await create_partner(session, busy_runtime)
        revenue = await ledger.system_account(session, SystemAccount.revenue, currency="USD")
        wallet_id = await ledger.open_wallet(session, owner, currency="USD")
        admin = uuid4()
    # Pending withdrawals that the concurrent approvals and rejections will race on.
    async with db.session() as session:
        await ledger.transfer(
            session, key=f"seed:{owner}", debit=revenue, credit=wallet_id, amount=200_000,
            currency="USD", kind="earning",
        )  # fmt: skip
    seeded: list[UUID] = []
    for _ in range(60):
        async with db.session() as session:
            seeded.append(
                (
                    await wallet_service.request_withdrawal(
                        session, busy_runtime, owner, amount=1_000
                    )
                ).id
            )

    credited: dict[str, int] = {"seed": 200_000}
    outcomes: dict[str, int] = {}

    def count(name: str) -> None:
        outcomes[name] = outcomes.get(name, 0) + 1

    async def credit(key: str, amount: int, standalone: bool) -> None:
        """Half the credits in a unit of work, half standalone (one autocommit call); a
        retried key may come back through the other path and must still count once."""
        if standalone:
            posted = await ledger.transfer_now(
                db.primary, key=key, debit=revenue, credit=wallet_id, amount=amount,
                currency="USD", kind="earning",
            )  # fmt: skip
        else:
            async with db.session() as session:
                posted = await ledger.transfer(
                    session, key=key, debit=revenue, credit=wallet_id, amount=amount,
                    currency="USD", kind="earning",
                )  # fmt: skip
        if posted.created:
            assert key not in credited
            credited[key] = amount
        count("credit.created" if posted.created else "credit.replayed")

    keyed: dict[str, list[str]] = {}

    async def withdraw(amount: int, key: str | None = None) -> None:
        """What POST /api/v1/withdrawals does: claim the key, reserve, remember the reply."""
        outcome = await _withdraw(amount, key)
        count(f"withdraw.{outcome}")
        if key is not None:
            keyed.setdefault(key, []).append(outcome)

    async def _withdraw(amount: int, key: str | None) -> str:
        body = orjson.dumps({"amount": amount})
        try:
            async with db.session() as session:
                if key is not None:
                    stored = await idempotency_keys.claim(
                        session, scope=f"user:{owner}", key=key,
                        fingerprint=fingerprint("POST", "/api/v1/withdrawals", body),
                    )  # fmt: skip
                    if stored is not None:
                        return "replayed"
                made = await wallet_service.request_withdrawal(
                    session, busy_runtime, owner, amount=amount
                )
                if key is not None:
                    reply = Response(orjson.dumps({"id": str(made.id)}), status_code=201)
                    await idempotency_keys.store(
                        session, scope=f"user:{owner}", key=key, response=reply
                    )
            return "created"
        except SurgeError as error:
            return str(error.status_code)

    async def decide(withdrawal_id: UUID, approve: bool) -> None:
        try:
            async with db.session() as session:
                await wallet_service.decide(
                    session, busy_runtime, admin, withdrawal_id, approve=approve
                )
            count("decide.ok")
        except SurgeError as error:
            count(f"decide.{error.status_code}")

    operations = []
    retried_keys = [f"credit:{uuid4()}" for _ in range(100)]
    idem_keys = [f"idem:{uuid4()}" for _ in range(50)]
    for i in range(OPERATIONS):
        kind = i % 10
        if kind < 4:  # 400 fresh credits
            operations.append(credit(f"credit:{uuid4()}", rng.randint(1, 5_000), i % 2 == 0))
        elif kind in {4, 5}:  # 100 retried credits: 100 keys, each sent twice below (200 ops)
            operations.append(credit(retried_keys[i // 10], 1_234, kind == 5))
        elif kind == 6:  # 100 withdrawal requests, some beyond what is available
            operations.append(withdraw(rng.choice([1_000, 5_000, 50_000, 900_000])))
        elif kind == 7:  # 100 requests under 50 Idempotency-Keys, each key sent twice
            operations.append(withdraw(2_000, idem_keys[(i // 10) % 50]))
        else:  # 200 decisions on 60 withdrawals: approve/reject races, repeats
            operations.append(decide(rng.choice(seeded), rng.random() < 0.6))
    rng.shuffle(operations)
    await asyncio.gather(*operations)

    async with db.session() as session:
        assert await ledger.check_invariants(session) == []
        balance = await ledger.balance(session, wallet_id)
        approved = (
            await session.execute(
                text(
                    "SELECT coalesce(sum(amount), 0) FROM wallet_withdrawals "
                    "WHERE owner_id = :o AND status = 'approved'"
                ),
                {"o": owner},
            )
        ).scalar_one()
        pending = (
            await session.execute(
                text(
                    "SELECT coalesce(sum(amount), 0) FROM wallet_withdrawals "
                    "WHERE owner_id = :o AND status = 'pending'"
                ),
                {"o": owner},
            )
        ).scalar_one()
        per_key = (
            await session.execute(
                text("SELECT count(*) FROM idempotency_keys WHERE scope = :s AND key = ANY(:k)"),
                {"s": f"user:{owner}", "k": idem_keys},
            )
        ).scalar_one()
        requests = (
            await session.execute(
                text("SELECT count(*) FROM wallet_withdrawals WHERE owner_id = :o"), {"o": owner}
            )
        ).scalar_one()

    # Every credited key counted once, whatever the retries; the wallet is exactly that
    # minus what was approved; what is reserved is exactly the pending requests.
    assert outcomes["credit.created"] == 400 + 100
    assert outcomes["credit.replayed"] == 100
    assert balance.balance == sum(credited.values()) - approved
    assert balance.pending_out == pending
    assert balance.available >= 0
    # 50 keys, each used twice. A key has at most one effect: one reservation, the other
    # request replayed (or refused, when the first attempt was refused for lack of funds
    # and so freed the key: the retry then ran for real). Never two reservations.
    assert len(keyed) == 50
    assert all(len(seen) == 2 for seen in keyed.values())
    with_effect = [seen for seen in keyed.values() if "created" in seen]
    assert all(seen.count("created") == 1 for seen in with_effect)
    assert all(set(seen) <= {"created", "replayed", "409"} for seen in keyed.values())
    assert all(seen == ["409", "409"] for seen in keyed.values() if "created" not in seen)
    assert all(seen[1] == "replayed" for seen in with_effect if seen[0] == "created")
    assert per_key == len(with_effect)
    assert outcomes.get("withdraw.replayed", 0) >= 1
    assert requests == 60 + outcomes["withdraw.created"]
    # Every decision either applied, repeated harmlessly, or was refused as a conflict.
    decided = sum(v for k, v in outcomes.items() if k.startswith("decide."))
    assert decided == 200
    assert {k for k in outcomes if k.startswith("decide.")} <= {"decide.ok", "decide.409"}
