"""A hostile partner and racing admins against the wallet's money paths, through the real
app: an Idempotency-Key replayed after its HTTP record expired, withdrawals racing past the
balance, approve and reject racing on one withdrawal. After each attack the ledger's
invariants hold (every transfer balances, no wallet below zero, balances = their entries)."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import Caller
from tests.fixtures.keys import expire_key
from tests.wallet.test_api import assert_invariants, funded_partner, withdraw


async def available(api: httpx.AsyncClient, who: Caller) -> int:
    wallet = (await api.get("/api/v1/wallet", headers=who.headers)).json()
    value: int = wallet["available"]
    return value


class TestKeyReplayedAfterItsTtl:
    async def test_the_same_request_reserves_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """A client (or an attacker replaying a captured request) resends a withdrawal a day
        later with its Idempotency-Key: it names the withdrawal it made, not a second one."""
        partner = await funded_partner(wallet_app, api, amount=10_000)
        key = f"payout-{uuid4()}"
        first = await withdraw(api, partner, 4_000, key)
        assert first.status_code == 201, first.text
        await expire_key(wallet_app, key)
        again = await withdraw(api, partner, 4_000, key)
        assert again.status_code in (200, 201), again.text
        assert again.json()["id"] == first.json()["id"]
        listed = (await api.get("/api/v1/withdrawals", headers=partner.headers)).json()
        assert len(listed["items"]) == 1
        assert await available(api, partner) == 6_000
        await assert_invariants(wallet_app)

    async def test_another_amount_under_the_same_key_is_a_422(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=10_000)
        key = f"payout-{uuid4()}"
        assert (await withdraw(api, partner, 4_000, key)).status_code == 201
        await expire_key(wallet_app, key)
        other = await withdraw(api, partner, 5_000, key)
        assert other.status_code == 422, other.text
        assert other.headers["content-type"] == "application/problem+json"
        assert await available(api, partner) == 6_000
        await assert_invariants(wallet_app)

    async def test_keys_are_per_owner(self, wallet_app: FastAPI, api: httpx.AsyncClient) -> None:
        """Two partners using the same key string each get their own withdrawal."""
        a = await funded_partner(wallet_app, api, amount=10_000)
        b = await funded_partner(wallet_app, api, amount=10_000)
        key = f"payout-{uuid4()}"
        made_a = await withdraw(api, a, 1_000, key)
        made_b = await withdraw(api, b, 2_000, key)
        assert made_a.status_code == made_b.status_code == 201
        assert made_a.json()["id"] != made_b.json()["id"]
        assert (await available(api, a), await available(api, b)) == (9_000, 8_000)


class TestRaces:
    async def test_concurrent_withdrawals_never_exceed_the_balance(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=10_000)
        replies = await asyncio.gather(
            *(withdraw(api, partner, 3_000, f"k-{uuid4()}") for _ in range(12))
        )
        codes = sorted(r.status_code for r in replies)
        assert codes == [201] * 3 + [409] * 9, codes
        assert all(
            r.headers["content-type"] == "application/problem+json"
            for r in replies
            if r.status_code == 409
        )
        assert await available(api, partner) == 1_000
        await assert_invariants(wallet_app)

    async def test_approve_and_reject_racing_decide_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=10_000)
        made = (await withdraw(api, partner, 4_000)).json()
        path = f"/api/admin/withdrawals/{made['id']}"
        replies = await asyncio.gather(
            *(
                api.post(f"{path}/{'approve' if n % 2 else 'reject'}", headers=admin.headers)
                for n in range(8)
            )
        )
        winners = {r.json()["status"] for r in replies if r.status_code == 200}
        assert len(winners) == 1, [r.text for r in replies]
        assert {r.status_code for r in replies} <= {200, 409}
        decided = await api.get(f"/api/v1/withdrawals/{made['id']}", headers=partner.headers)
        wallet = (await api.get("/api/v1/wallet", headers=partner.headers)).json()
        if decided.json()["status"] == "approved":
            assert (wallet["balance"], wallet["available"]) == (6_000, 6_000)
        else:
            assert (wallet["balance"], wallet["available"]) == (10_000, 10_000)
        await assert_invariants(wallet_app)


LIMIT_TYPE = "https://surge.dev/problems/withdrawal-limit-reached"


class TestDailyLimit:
    """A stolen session (or a partner emptying a wallet before a dispute lands) asked for as
    many maximum-sized withdrawals as it liked: the per-request maximum bounded nothing.
    ADR 0051: at most ``WALLET_WITHDRAWAL_DAILY_MAX`` in any 24 hours, under the wallet's
    lock, pending and approved requests together."""

    async def test_concurrent_requests_with_fresh_keys_stop_at_the_cap(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        cap = runtime_of(wallet_app).settings.WALLET_WITHDRAWAL_DAILY_MAX
        each = cap // 4
        partner = await funded_partner(wallet_app, api, amount=cap * 3)
        replies = await asyncio.gather(
            *(withdraw(api, partner, each, f"k-{uuid4()}") for _ in range(12))
        )
        codes = sorted(r.status_code for r in replies)
        assert codes == [201] * 4 + [409] * 8, codes
        for refused in (r for r in replies if r.status_code == 409):
            assert refused.headers["content-type"] == "application/problem+json"
            problem = refused.json()
            assert (problem["type"], problem["limit"], problem["remaining"]) == (LIMIT_TYPE, cap, 0)
        assert await available(api, partner) == cap * 2
        await assert_invariants(wallet_app)

    async def test_the_remainder_is_stated_and_a_larger_request_refused_whole(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        cap = runtime_of(wallet_app).settings.WALLET_WITHDRAWAL_DAILY_MAX
        partner = await funded_partner(wallet_app, api, amount=cap * 2)
        await withdraw_up_to(wallet_app, api, partner, cap - 5_000)
        over = await withdraw(api, partner, 5_001)
        assert over.status_code == 409, over.text
        assert over.json()["remaining"] == 5_000
        assert await available(api, partner) == cap * 2 - (cap - 5_000)
        assert (await withdraw(api, partner, 5_000)).status_code == 201

    async def test_a_rejected_request_gives_its_share_back(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        cap = runtime_of(wallet_app).settings.WALLET_WITHDRAWAL_DAILY_MAX
        partner = await funded_partner(wallet_app, api, amount=cap * 2)
        made = await withdraw_up_to(wallet_app, api, partner, cap)
        assert (await withdraw(api, partner, 1_000)).status_code == 409
        path = f"/api/admin/withdrawals/{made[0]}/reject"
        assert (await api.post(path, headers=admin.headers)).status_code == 200
        assert (await withdraw(api, partner, 1_000)).status_code == 201

    async def test_approved_requests_count_until_the_window_has_passed(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        """The window is the database's clock: the test ages the rows instead of waiting."""
        cap = runtime_of(wallet_app).settings.WALLET_WITHDRAWAL_DAILY_MAX
        partner = await funded_partner(wallet_app, api, amount=cap * 2)
        for made in await withdraw_up_to(wallet_app, api, partner, cap):
            path = f"/api/admin/withdrawals/{made}/approve"
            decided = await api.post(path, headers=admin.headers)
            if decided.status_code == 202:  # above APPROVAL_THRESHOLD: four-eyes (ADR 0059)
                approval = decided.json()["approval"]["id"]
                decided = await api.post(
                    f"/api/admin/approvals/{approval}/approve", headers=second_admin.headers
                )
            assert decided.status_code == 200, decided.text
        assert (await withdraw(api, partner, 1_000)).status_code == 409
        await age_withdrawals(wallet_app, partner, hours=23)
        assert (await withdraw(api, partner, 1_000)).status_code == 409
        await age_withdrawals(wallet_app, partner, hours=2)  # 25 h ago now
        assert (await withdraw(api, partner, 1_000)).status_code == 201
        await assert_invariants(wallet_app)


async def withdraw_up_to(
    app: FastAPI, api: httpx.AsyncClient, who: Caller, total: int
) -> list[str]:
    """Withdraw ``total`` in requests of at most ``WALLET_WITHDRAWAL_MAX``; their ids."""
    most = runtime_of(app).settings.WALLET_WITHDRAWAL_MAX
    ids = []
    while total > 0:
        made = await withdraw(api, who, min(most, total))
        assert made.status_code == 201, made.text
        ids.append(str(made.json()["id"]))
        total -= min(most, total)
    return ids


async def age_withdrawals(app: FastAPI, who: Caller, *, hours: int) -> None:
    async with runtime_of(app).db.session() as session:
        await session.execute(
            text(
                "UPDATE wallet_withdrawals SET created_at = created_at - make_interval(hours => :h)"
                " WHERE owner_id = :o"
            ),
            {"h": hours, "o": who.id},
        )


class TestOperatorsMoneyIsAudited:
    async def test_an_admins_revenue_event_is_in_the_audit_log_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        """An MFA administrator may record a revenue event: every active partner is then
        credited. It was the one money action an operator could take without an audit row
        (ADR 0051). A replay changes nothing and adds no row."""
        event = {"id": f"game-{uuid4()}", "kind": "game", "profit": 99_999}
        created = await api.post("/api/v1/revenue-events", json=event, headers=admin.headers)
        assert created.status_code == 201, created.text
        replay = await api.post("/api/v1/revenue-events", json=event, headers=admin.headers)
        assert replay.status_code == 200, replay.text
        async with runtime_of(wallet_app).db.session() as session:
            rows = (
                await session.execute(
                    text(
                        "SELECT actor_id, after FROM audit_log "
                        "WHERE action = 'wallet.revenue_event.record' AND subject_id = :s"
                    ),
                    {"s": event["id"]},
                )
            ).all()
        assert [(row.actor_id, row.after["profit"]) for row in rows] == [(admin.id, 99_999)]

    async def test_a_money_job_cancelled_or_retried_through_the_api_is_audited(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        """Cancelling the queued job that would credit an event's earnings (or apply a
        payment's chargeback) changes who holds money; the console audited it, the API's
        ``/api/admin/jobs/{id}/cancel|retry`` did not."""
        event = {"id": f"game-{uuid4()}", "kind": "game", "profit": 1_000}
        assert (
            await api.post("/api/v1/revenue-events", json=event, headers=admin.headers)
        ).status_code == 201
        async with runtime_of(wallet_app).db.session() as session:
            job_id = await session.scalar(
                text("SELECT id FROM jobs WHERE dedup_key = :k"), {"k": f"earnings:{event['id']}:"}
            )
        assert job_id is not None
        for verb in ("cancel", "retry"):
            done = await api.post(f"/api/admin/jobs/{job_id}/{verb}", headers=admin.headers)
            assert done.status_code == 200, done.text
        async with runtime_of(wallet_app).db.session() as session:
            rows = (
                await session.execute(
                    text(
                        "SELECT action, actor_id, after FROM audit_log "
                        "WHERE subject_type = 'job' AND subject_id = :s ORDER BY id"
                    ),
                    {"s": str(job_id)},
                )
            ).all()
        assert [(r.action, r.actor_id, r.after["name"], r.after["state"]) for r in rows] == [
            ("jobs.job.cancel", admin.id, "wallet.earnings.credit", "cancelled"),
            ("jobs.job.retry", admin.id, "wallet.earnings.credit", "queued"),
        ]
