"""Four-eyes (ADR 0059): an administrator's money action above the threshold is recorded
pending and happens only when a *different* administrator approves it — payouts (single and
batched), revenue events, generous partner terms, and the debt write-off. Each test failed
against main, where one MFA administrator could do all of it alone."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from surge.wallet.accounts import SystemAccount
from surge.wallet.funds import funds as funds_service
from surge.wallet.ledger import ledger
from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import Caller
from tests.wallet.conftest import make_partner
from tests.wallet.test_api import assert_invariants, funded_partner, withdraw

BIG = 600_000  # above APPROVAL_THRESHOLD (500 000), within WALLET_WITHDRAWAL_MAX


async def _scalar(app: FastAPI, sql: str, **params: Any) -> Any:
    async with runtime_of(app).db.session() as session:
        return (await session.execute(text(sql), params)).scalar()


async def _status(app: FastAPI, withdrawal_id: str) -> str:
    return str(
        await _scalar(app, "SELECT status FROM wallet_withdrawals WHERE id = :i", i=withdrawal_id)
    )


async def _decide(
    api: httpx.AsyncClient, who: Caller, approval_id: str, verb: str = "approve"
) -> httpx.Response:
    return await api.post(f"/api/admin/approvals/{approval_id}/{verb}", headers=who.headers)


class TestPayouts:
    async def test_a_large_payout_waits_for_a_different_administrator(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=1_000_000)
        withdrawal_id = (await withdraw(api, partner, BIG)).json()["id"]
        asked = await api.post(
            f"/api/admin/withdrawals/{withdrawal_id}/approve", headers=admin.headers
        )
        assert asked.status_code == 202, asked.text
        assert asked.headers["content-type"] == "application/problem+json"
        approval = asked.json()["approval"]
        assert (approval["action"], approval["amount"]) == ("wallet.withdrawal.approve", BIG)
        assert await _status(wallet_app, withdrawal_id) == "pending"  # nothing paid out
        again = await api.post(
            f"/api/admin/withdrawals/{withdrawal_id}/approve", headers=admin.headers
        )
        assert again.status_code == 202
        assert again.json()["approval"]["id"] == approval["id"]  # the same request

        own = await _decide(api, admin, approval["id"])
        assert own.status_code == 403, own.text  # the maker never decides their own
        assert await _status(wallet_app, withdrawal_id) == "pending"

        done = await _decide(api, second_admin, approval["id"])
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "approved"
        assert done.json()["checker_id"] == str(second_admin.id)
        assert await _status(wallet_app, withdrawal_id) == "approved"
        replay = await _decide(api, second_admin, approval["id"])
        assert replay.status_code == 200  # idempotent: nothing happens twice
        assert (await _decide(api, second_admin, approval["id"], "reject")).status_code == 409
        paid = await _scalar(
            wallet_app,
            "SELECT count(*) FROM wallet_transfers WHERE idempotency_key = :k",
            k=f"withdrawal:{withdrawal_id}:payout",
        )
        assert paid == 1
        audited = await _scalar(
            wallet_app,
            "SELECT after FROM audit_log WHERE action = 'wallet.withdrawal.approve' "
            "AND subject_id = :s",
            s=withdrawal_id,
        )
        assert audited["approved_by"] == str(second_admin.id)
        await assert_invariants(wallet_app)

    async def test_two_checkers_at_once_pay_out_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=1_000_000)
        withdrawal_id = (await withdraw(api, partner, BIG)).json()["id"]
        approval = (
            await api.post(f"/api/admin/withdrawals/{withdrawal_id}/approve", headers=admin.headers)
        ).json()["approval"]
        replies = await asyncio.gather(
            *(_decide(api, second_admin, approval["id"]) for _ in range(5))
        )
        assert {r.status_code for r in replies} == {200}
        assert await _status(wallet_app, withdrawal_id) == "approved"
        await assert_invariants(wallet_app)

    async def test_a_small_payout_still_takes_one_administrator(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        withdrawal_id = (await withdraw(api, partner, 5_000)).json()["id"]
        done = await api.post(
            f"/api/admin/withdrawals/{withdrawal_id}/approve", headers=admin.headers
        )
        assert done.status_code == 200, done.text

    async def test_a_batch_records_its_large_items_and_pays_the_small_ones(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=1_000_000)
        small = (await withdraw(api, partner, 5_000)).json()["id"]
        large = (await withdraw(api, partner, BIG)).json()["id"]
        batch = await api.post(
            "/api/admin/withdrawals/batch-approve", json={"ids": [small, large]},
            headers=admin.headers,
        )  # fmt: skip
        assert batch.status_code == 200, batch.text
        by_id = {item["id"]: item for item in batch.json()["results"]}
        assert by_id[small]["ok"] is True
        assert (by_id[large]["ok"], by_id[large]["code"]) == (False, 202)
        assert await _status(wallet_app, large) == "pending"
        pending = (await api.get("/api/admin/approvals", headers=second_admin.headers)).json()
        [request] = [a for a in pending["items"] if a["subject_id"] == large]
        assert (await _decide(api, second_admin, request["id"])).status_code == 200
        assert await _status(wallet_app, large) == "approved"

    async def test_a_rejected_or_expired_request_pays_nothing(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=1_000_000)
        withdrawal_id = (await withdraw(api, partner, BIG)).json()["id"]
        url = f"/api/admin/withdrawals/{withdrawal_id}/approve"
        first = (await api.post(url, headers=admin.headers)).json()["approval"]
        rejected = await _decide(api, second_admin, first["id"], "reject")
        assert rejected.status_code == 200, rejected.text
        assert rejected.json()["status"] == "rejected"
        assert (await _decide(api, second_admin, first["id"])).status_code == 409
        assert await _status(wallet_app, withdrawal_id) == "pending"
        second = (await api.post(url, headers=admin.headers)).json()["approval"]
        assert second["id"] != first["id"]  # asked again: a new request
        async with runtime_of(wallet_app).db.session() as session:
            await session.execute(
                text("UPDATE admin_approvals SET expires_at = now() - interval '1 second' "
                     "WHERE id = :i"), {"i": second["id"]},
            )  # fmt: skip
        late = await _decide(api, second_admin, second["id"])
        assert late.status_code == 409, late.text
        assert await _status(wallet_app, withdrawal_id) == "pending"
        found = await api.get(f"/api/admin/approvals/{second['id']}", headers=admin.headers)
        assert found.json()["status"] == "expired"


class TestMoneyCreation:
    async def test_generous_terms_wait_for_a_second_administrator(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        all_of_it = {"share_bps": 10_000, "commission_bps": 10_000}
        asked = await api.put(
            f"/api/admin/partners/{partner.id}", json=all_of_it, headers=admin.headers
        )
        assert asked.status_code == 202, asked.text
        share = "SELECT share_bps FROM wallet_partners WHERE owner_id = :o"
        assert await _scalar(wallet_app, share, o=partner.id) != 10_000
        approval_id = asked.json()["approval"]["id"]
        assert (await _decide(api, admin, approval_id)).status_code == 403
        assert (await _decide(api, second_admin, approval_id)).status_code == 200
        assert await _scalar(wallet_app, share, o=partner.id) == 10_000
        usual = await api.put(
            f"/api/admin/partners/{partner.id}", json={"share_bps": 4_000}, headers=admin.headers
        )
        assert usual.status_code == 200, usual.text  # lowering never waits

    async def test_a_large_revenue_event_from_a_person_waits(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        event = {"id": f"game-{uuid4()}", "kind": "game", "profit": 9_999_999}
        asked = await api.post("/api/v1/revenue-events", json=event, headers=admin.headers)
        assert asked.status_code == 202, asked.text
        recorded = "SELECT count(*) FROM wallet_revenue_events WHERE id = :i"
        assert await _scalar(wallet_app, recorded, i=event["id"]) == 0
        done = await _decide(api, second_admin, asked.json()["approval"]["id"])
        assert done.status_code == 200, done.text
        assert await _scalar(wallet_app, recorded, i=event["id"]) == 1
        replay = await api.post("/api/v1/revenue-events", json=event, headers=admin.headers)
        assert replay.status_code == 200  # recorded: a replay, not a new request
        audited = await _scalar(
            wallet_app,
            "SELECT count(*) FROM audit_log WHERE action = 'wallet.revenue_event.record' "
            "AND subject_id = :s AND actor_id = :a AND after->>'approved_by' = :c",
            s=event["id"], a=admin.id, c=str(second_admin.id),
        )  # fmt: skip
        assert audited == 1


class TestDebtWriteOff:
    async def _in_debt(self, app: FastAPI, api: httpx.AsyncClient, owed: int) -> Caller:
        partner = await make_partner(app, api)
        async with runtime_of(app).db.session() as session:
            await funds_service.reverse(
                session, partner.id, amount=owed, currency="USD", key=f"rev:{uuid4()}",
                kind="refund",
            )  # fmt: skip
        return partner

    async def _wallet(self, app: FastAPI, owner: UUID) -> tuple[int, int]:
        async with runtime_of(app).db.session() as session:
            account = await ledger.wallet_of(session, owner, currency="USD")
            assert account is not None
            found = await ledger.balance(session, account)
        return found.balance, found.debt

    async def test_a_write_off_forgives_the_debt_through_the_ledger_under_four_eyes(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        partner = await self._in_debt(wallet_app, api, 7_000)
        assert await self._wallet(wallet_app, partner.id) == (0, 7_000)
        url = f"/api/admin/wallets/{partner.id}/debt-write-off"
        too_much = await api.post(url, json={"amount": 7_001, "reason": "x"}, headers=admin.headers)
        assert too_much.status_code == 409, too_much.text
        asked = await api.post(url, json={"reason": "fraud, card closed"}, headers=admin.headers)
        assert asked.status_code == 202, asked.text  # always four-eyes, whatever the amount
        approval_id = asked.json()["approval"]["id"]
        assert await self._wallet(wallet_app, partner.id) == (0, 7_000)
        assert (await _decide(api, admin, approval_id)).status_code == 403
        done = await _decide(api, second_admin, approval_id)
        assert done.status_code == 200, done.text
        assert done.json()["result"] == {"written_off": 7_000, "debt_before": 7_000}
        assert await self._wallet(wallet_app, partner.id) == (0, 0)
        async with runtime_of(wallet_app).db.session() as session:
            loss = await ledger.system_account(session, SystemAccount.bad_debt, currency="USD")
            assert (await ledger.balance(session, loss)).balance <= -7_000
        assert (await _decide(api, second_admin, approval_id)).status_code == 200  # once
        assert await self._wallet(wallet_app, partner.id) == (0, 0)
        nothing = await api.post(url, json={"reason": "again"}, headers=admin.headers)
        assert nothing.status_code == 409, nothing.text
        audited = await _scalar(
            wallet_app,
            "SELECT after FROM audit_log WHERE action = 'wallet.debt.write_off' "
            "AND subject_id = :s",
            s=str(partner.id),
        )
        assert audited["written_off"] == 7_000
        assert audited["approved_by"] == str(second_admin.id)
        await assert_invariants(wallet_app)
