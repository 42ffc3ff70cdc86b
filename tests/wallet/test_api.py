"""The wallet API end to end on the real app: identity (JWT, roles, MFA admins), kit.jobs
(earnings and notifications enqueued in the request's transaction), kit.cache (stats),
PostgreSQL and Redis — partner isolation, Idempotency-Key semantics, admin decisions."""

from __future__ import annotations

import asyncio
import base64
from uuid import uuid4

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from surge.wallet.ledger import ledger
from surge.wallet.service import wallet as wallet_service
from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import Caller
from tests.wallet.conftest import make_partner, wallet_worker
from tests.wallet.factories import fund


async def funded_partner(app: FastAPI, api: httpx.AsyncClient, amount: int = 100_000) -> Caller:
    partner = await make_partner(app, api)
    async with runtime_of(app).db.session() as session:
        await fund(session, partner.id, amount)
    return partner


async def withdraw(
    api: httpx.AsyncClient, who: Caller, amount: int, key: str | None = None
) -> httpx.Response:
    """A partner's withdrawal request; a fresh key unless the test names one (the key is
    required: ADR 0035)."""
    headers = {**who.headers, "Idempotency-Key": key or f"k-{uuid4()}"}
    return await api.post("/api/v1/withdrawals", json={"amount": amount}, headers=headers)


async def assert_invariants(app: FastAPI) -> None:
    async with runtime_of(app).db.session() as session:
        assert await ledger.check_invariants(session) == []


class TestIsolation:
    async def test_partner_b_cannot_see_or_touch_partner_a(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        a = await funded_partner(wallet_app, api)
        b = await funded_partner(wallet_app, api, amount=7)
        made = await withdraw(api, a, 5_000)
        assert made.status_code == 201, made.text
        withdrawal_id = made.json()["id"]

        # A's withdrawal by id: A sees it, B gets 404 (not 403: its existence is not leaked).
        assert (
            await api.get(f"/api/v1/withdrawals/{withdrawal_id}", headers=a.headers)
        ).status_code == 200
        other = await api.get(f"/api/v1/withdrawals/{withdrawal_id}", headers=b.headers)
        assert other.status_code == 404
        assert other.headers["content-type"] == "application/problem+json"
        # B's lists and stats hold B's money only.
        listed = (await api.get("/api/v1/withdrawals", headers=b.headers)).json()
        assert listed["items"] == []
        history = (await api.get("/api/v1/wallet/transactions", headers=b.headers)).json()
        assert [item["amount"] for item in history["items"]] == [7]
        stats = (await api.get("/api/v1/wallet/stats", headers=b.headers)).json()
        assert (stats["balance"], stats["withdrawals_pending"]) == (7, 0)
        a_stats = (await api.get("/api/v1/wallet/stats", headers=a.headers)).json()
        assert (a_stats["balance"], a_stats["withdrawals_pending"]) == (100_000, 5_000)
        # A partner cannot act as an admin on anyone's withdrawal.
        approve = await api.post(
            f"/api/admin/withdrawals/{withdrawal_id}/approve", headers=b.headers
        )
        assert approve.status_code == 403

    async def test_row_level_security_hides_other_owners_even_without_a_filter(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """Superusers bypass RLS, so the probe runs as a plain role, as production should."""
        a = await funded_partner(wallet_app, api)
        b = await funded_partner(wallet_app, api)
        assert (await withdraw(api, a, 1_000)).status_code == 201
        assert (await withdraw(api, b, 1_000)).status_code == 201
        async with runtime_of(wallet_app).db.session() as session:
            await session.execute(
                text(
                    "DO $$ BEGIN CREATE ROLE wallet_rls_probe NOLOGIN; "
                    "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
                )
            )
            await session.execute(text("GRANT SELECT ON wallet_withdrawals TO wallet_rls_probe"))
        async with runtime_of(wallet_app).db.session() as session:
            await session.execute(text("SET LOCAL ROLE wallet_rls_probe"))
            await session.execute(
                text("SELECT set_config('surge.owner_id', :o, true)"), {"o": str(b.id)}
            )
            owners = set(
                (await session.execute(text("SELECT owner_id FROM wallet_withdrawals"))).scalars()
            )
        assert owners == {b.id}


class TestIdempotencyKey:
    async def test_missing_key_is_428_and_nothing_is_reserved(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """A withdrawal without a key would be a new withdrawal on every retry: refused."""
        partner = await funded_partner(wallet_app, api)
        for _ in range(2):  # the client's retry
            response = await api.post(
                "/api/v1/withdrawals", json={"amount": 2_000}, headers=partner.headers
            )
            assert response.status_code == 428, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["header"] == "Idempotency-Key"
            assert "Idempotency-Key" in response.json()["detail"]
        async with runtime_of(wallet_app).db.session() as session:
            rows = await session.scalar(
                text("SELECT count(*) FROM wallet_withdrawals WHERE owner_id = :o"),
                {"o": partner.id},
            )
            keys = await session.scalar(
                text("SELECT count(*) FROM idempotency_keys WHERE scope = :s"),
                {"s": f"user:{partner.id}"},
            )
        assert rows == 0
        assert keys == 0
        wallet = (await api.get("/api/v1/wallet", headers=partner.headers)).json()
        assert wallet["available"] == wallet["withdrawable"] == 100_000  # earned, not topped up

    async def test_same_key_same_body_replays_the_first_response(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        key = f"k-{uuid4()}"
        first = await withdraw(api, partner, 2_000, key)
        again = await withdraw(api, partner, 2_000, key)
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        listed = (await api.get("/api/v1/withdrawals", headers=partner.headers)).json()
        assert len(listed["items"]) == 1
        wallet = (await api.get("/api/v1/wallet", headers=partner.headers)).json()
        assert wallet["available"] == 98_000

    async def test_same_key_different_body_is_422(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        key = f"k-{uuid4()}"
        assert (await withdraw(api, partner, 2_000, key)).status_code == 201
        other = await withdraw(api, partner, 3_000, key)
        assert other.status_code == 422
        assert other.json()["type"].endswith("idempotency-key-mismatch")
        wallet = (await api.get("/api/v1/wallet", headers=partner.headers)).json()
        assert wallet["available"] == 98_000

    async def test_concurrent_duplicates_have_one_effect(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        key = f"k-{uuid4()}"
        replies = await asyncio.gather(*(withdraw(api, partner, 1_000, key) for _ in range(8)))
        assert {r.status_code for r in replies} == {201}
        assert len({r.json()["id"] for r in replies}) == 1
        wallet = (await api.get("/api/v1/wallet", headers=partner.headers)).json()
        assert wallet["available"] == 99_000

    async def test_a_failed_attempt_does_not_burn_the_key(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        partner = await funded_partner(wallet_app, api, amount=500)
        key = f"k-{uuid4()}"
        assert (await withdraw(api, partner, 600, key)).status_code == 409  # insufficient
        async with runtime_of(wallet_app).db.session() as session:
            await fund(session, partner.id, 500)
        assert (await withdraw(api, partner, 600, key)).status_code == 201


class TestWithdrawalDecisions:
    async def test_approve_reject_and_batch_with_per_item_results(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        ids = [(await withdraw(api, partner, 10_000)).json()["id"] for _ in range(4)]
        rejected = await api.post(
            f"/api/admin/withdrawals/{ids[0]}/reject", json={"reason": "KYC"}, headers=admin.headers
        )
        assert rejected.status_code == 200
        assert rejected.json()["status"] == "rejected"
        approved = await api.post(f"/api/admin/withdrawals/{ids[1]}/approve", headers=admin.headers)
        assert approved.status_code == 200
        assert approved.json()["status"] == "approved"
        missing = str(uuid4())
        batch = await api.post(
            "/api/admin/withdrawals/batch-approve",
            json={"ids": [ids[2], ids[0], missing, ids[3]]},
            headers=admin.headers,
        )
        assert batch.status_code == 200, batch.text
        results = {item["id"]: item for item in batch.json()["results"]}
        assert results[ids[2]]["ok"]
        assert results[ids[3]]["ok"]
        assert (results[ids[0]]["ok"], results[ids[0]]["code"]) == (False, 409)  # was rejected
        assert (results[missing]["ok"], results[missing]["code"]) == (False, 404)
        assert (batch.json()["approved"], batch.json()["failed"]) == (2, 2)

        wallet = (await api.get("/api/v1/wallet", headers=partner.headers)).json()
        assert (wallet["balance"], wallet["available"]) == (70_000, 70_000)
        history = (await api.get("/api/v1/wallet/transactions", headers=partner.headers)).json()
        assert [i["amount"] for i in history["items"]] == [-10_000, -10_000, -10_000, 100_000]
        for item in history["items"]:
            assert item["balance_after"] == item["balance_before"] + item["amount"]
        async with runtime_of(wallet_app).db.session() as session:
            audited = (
                await session.execute(
                    text(
                        "SELECT action, count(*) FROM audit_log WHERE subject_id = ANY(:ids) "
                        "GROUP BY action"
                    ),
                    {"ids": ids},
                )
            ).all()
            notified = (
                await session.execute(
                    text(
                        "SELECT count(*) FROM jobs WHERE name = 'wallet.withdrawal.notify' "
                        "AND payload->>'withdrawal_id' = ANY(:ids)"
                    ),
                    {"ids": ids},
                )
            ).scalar_one()
        assert dict(audited) == {
            "wallet.withdrawal.reject": 1,
            "wallet.withdrawal.approve": 3,
        }
        assert notified == 4
        await assert_invariants(wallet_app)

    async def test_admin_queue_lists_pending_withdrawals_of_every_partner(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        a = await funded_partner(wallet_app, api)
        b = await funded_partner(wallet_app, api)
        mine = {(await withdraw(api, who, 1_000)).json()["id"] for who in (a, b)}
        seen: set[str] = set()
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = await api.get("/api/admin/withdrawals", params=params, headers=admin.headers)
            assert page.status_code == 200, page.text
            seen |= {item["id"] for item in page.json()["items"]}
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        assert mine <= seen
        assert (await api.get("/api/admin/withdrawals", headers=a.headers)).status_code == 403

    async def test_amount_bounds(self, wallet_app: FastAPI, api: httpx.AsyncClient) -> None:
        partner = await funded_partner(wallet_app, api)
        assert (await withdraw(api, partner, 99)).status_code == 422  # WALLET_WITHDRAWAL_MIN=100
        assert (await withdraw(api, partner, 1_000_001)).status_code == 422
        assert (await withdraw(api, partner, 100_001)).status_code == 409  # more than available

    async def test_hostile_numbers_are_422_never_500(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        """Past BIGINT, floats, strings, negatives: refused as payload errors, nothing written."""
        partner = await funded_partner(wallet_app, api)
        for amount in (10**30, -5, 0, 100.5, "100", None):
            response = await api.post(
                "/api/v1/withdrawals", json={"amount": amount},
                headers={**partner.headers, "Idempotency-Key": f"k-{uuid4()}"},
            )  # fmt: skip
            assert response.status_code == 422, (amount, response.text)
            assert response.headers["content-type"] == "application/problem+json"
        for profit in (10**30, 1.5, "7"):
            response = await api.post(
                "/api/v1/revenue-events",
                json={"id": f"hostile-{uuid4()}", "kind": "game", "profit": profit},
                headers=admin.headers,
            )
            assert response.status_code == 422, (profit, response.text)
        await assert_invariants(wallet_app)


class TestHistoryOrder:
    async def test_concurrent_postings_list_in_posting_order(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """Issue 12: a transaction that *started* first but posted last has the older
        ``created_at`` (now() is the transaction's start); listed by ``created_at`` the
        balance chain read out of order. Listed by the entry sequence it chains."""
        partner = await make_partner(wallet_app, api)
        db = runtime_of(wallet_app).db
        async with db.session() as early:
            await early.execute(text("SELECT 1"))  # its transaction (and now()) starts here
            async with db.session() as late:
                await fund(late, partner.id, 62_500)  # starts later, commits first
            await fund(early, partner.id, 4_675)  # started earlier, posts second
        history = (await api.get("/api/v1/wallet/transactions", headers=partner.headers)).json()
        items = history["items"]
        assert [i["amount"] for i in items] == [4_675, 62_500]
        assert items[0]["created_at"] < items[1]["created_at"]  # the trap, really set
        assert items[1]["balance_before"] == 0
        assert items[0]["balance_before"] == items[1]["balance_after"]


class TestBatchAudit:
    async def test_batch_approvals_are_audited_like_single_ones(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        single, batched = [(await withdraw(api, partner, a)).json()["id"] for a in (1_000, 2_000)]
        response = await api.post(f"/api/admin/withdrawals/{single}/approve", headers=admin.headers)
        assert response.status_code == 200
        response = await api.post(
            "/api/admin/withdrawals/batch-approve", json={"ids": [batched]}, headers=admin.headers
        )
        assert response.status_code == 200
        rows = {
            row["subject_id"]: row
            for row in (
                await api.get(
                    "/api/admin/audit-log",
                    params={"subject_type": "withdrawal"},
                    headers=admin.headers,
                )
            ).json()["items"]
        }
        assert rows[single]["after"]["amount"] == 1_000
        assert rows[batched]["after"]["amount"] == 2_000
        assert rows[batched]["after"]["status"] == rows[single]["after"]["status"] == "approved"
        assert rows[batched]["action"] == rows[single]["action"] == "wallet.withdrawal.approve"
        assert rows[batched]["after"]["batch"] is True


class TestEarnings:
    async def test_revenue_event_credits_every_active_partner_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        runtime = runtime_of(wallet_app)
        partners = [await make_partner(wallet_app, api) for _ in range(3)]
        for partner, terms_body in zip(
            partners,
            ({"share_bps": 4_000}, {"share_bps": 2_500}, {"share_bps": 100, "commission_bps": 5}),
            strict=True,
        ):
            terms = await api.put(
                f"/api/admin/partners/{partner.id}", json=terms_body, headers=admin.headers
            )
            assert terms.status_code == 200, terms.text
        stats_before = (await api.get("/api/v1/wallet/stats", headers=partners[0].headers)).json()
        event = {"id": f"game-{uuid4()}", "kind": "game", "profit": 123_456}
        created = await api.post("/api/v1/revenue-events", json=event, headers=admin.headers)
        assert created.status_code == 201, created.text
        late = await make_partner(wallet_app, api)  # joins after the event: earns nothing
        joined = await api.put(
            f"/api/admin/partners/{late.id}", json={"share_bps": 9_000}, headers=admin.headers
        )
        assert joined.status_code == 200, joined.text
        replay = await api.post("/api/v1/revenue-events", json=event, headers=admin.headers)
        assert replay.status_code == 200
        assert replay.json()["created"] is False
        changed = await api.post(
            "/api/v1/revenue-events", json={**event, "profit": 1}, headers=admin.headers
        )
        assert changed.status_code == 409  # an event id names one set of figures, forever
        not_a_partner = await api.put(
            f"/api/admin/partners/{admin.id}", json={"share_bps": 1}, headers=admin.headers
        )
        assert not_a_partner.status_code == 422
        unknown = await api.put(
            f"/api/admin/partners/{uuid4()}", json={"share_bps": 1}, headers=admin.headers
        )
        assert unknown.status_code == 404
        forbidden = await api.post(
            "/api/v1/revenue-events", json=event, headers=partners[0].headers
        )
        assert forbidden.status_code == 403

        async with wallet_worker(runtime):
            for _ in range(200):
                earned = (await api.get("/api/v1/earnings", headers=partners[1].headers)).json()
                if earned["items"]:
                    break
                await asyncio.sleep(0.05)
        mine = (await api.get("/api/v1/earnings", headers=partners[0].headers)).json()["items"]
        # 123 456 × 40 % = 49 382 shown; × 10 % commission = 4 938 (rounded down).
        assert [(e["shown_profit"], e["amount"]) for e in mine] == [(49_382, 4_938)]
        assert "profit" not in mine[0]
        assert [e["amount"] for e in earned["items"]] == [3_086]  # 123 456 × 25 % × 10 %
        third = (await api.get("/api/v1/earnings", headers=partners[2].headers)).json()
        assert third["items"] == []  # 123 456 × 1 % × 0.05 % = 0.6: below one unit, skipped
        assert (await api.get("/api/v1/earnings", headers=late.headers)).json()["items"] == []
        # The stats cached before the event were invalidated by the earning's commit.
        stats = (await api.get("/api/v1/wallet/stats", headers=partners[0].headers)).json()
        assert stats_before["earnings_total"] == 0
        assert (stats["earnings_total"], stats["earnings_count"], stats["balance"]) == (
            4_938,
            1,
            4_938,
        )
        await assert_invariants(wallet_app)


class TestStats:
    async def test_view_refresh_neither_loses_nor_double_counts(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """Figures = view (rows older than its cut-off) + rows since: the same before and
        after a refresh moves an earning from the overlay into the view."""
        runtime = runtime_of(wallet_app)
        partner = await make_partner(wallet_app, api)
        async with runtime.db.session() as session:
            await wallet_service.set_partner(session, runtime, partner.id, share_bps=5_000)
            for minutes_ago, amount in ((5, 300), (0, 200)):
                await session.execute(
                    text(
                        "INSERT INTO wallet_earnings (event_id, owner_id, transfer_id, "
                        "shown_profit, amount, currency, share_bps, commission_bps, event_kind, "
                        "created_at) VALUES (:e, :o, 0, :s, :a, 'USD', 5000, 1000, 'game', "
                        "now() - make_interval(mins => :m))"
                    ),
                    {
                        "e": f"s-{uuid4()}",
                        "o": partner.id,
                        "s": amount * 10,
                        "a": amount,
                        "m": minutes_ago,
                    },
                )
        async with runtime.db.read_session() as session:
            before = await wallet_service.stats(session, runtime, partner.id)
        async with runtime.db.session() as session:
            assert await wallet_service.refresh_stats(session)
        async with runtime.db.read_session() as session:
            after = await wallet_service.stats(session, runtime, partner.id)
        assert before["refreshed_at"] != after["refreshed_at"]
        for figures in (before, after):
            assert (figures["earnings_count"], figures["earnings_total"]) == (2, 500)
            assert figures["shown_profit_total"] == 5_000


class TestPagination:
    async def test_transactions_cursor_walks_every_entry_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        partner = await make_partner(wallet_app, api)
        async with runtime_of(wallet_app).db.session() as session:
            for amount in range(1, 8):
                await fund(session, partner.id, amount)
        seen: list[int] = []
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = (
                await api.get("/api/v1/wallet/transactions", params=params, headers=partner.headers)
            ).json()
            seen += [item["amount"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == list(range(1, 8))
        too_many = await api.get(
            "/api/v1/wallet/transactions", params={"limit": 101}, headers=partner.headers
        )
        assert too_many.status_code == 422

    async def test_withdrawals_cursor_walks_every_request_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        mine = [(await withdraw(api, partner, 100 + i)).json()["id"] for i in range(5)]
        seen: list[str] = []
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = await api.get("/api/v1/withdrawals", params=params, headers=partner.headers)
            assert page.status_code == 200, page.text
            seen += [item["id"] for item in page.json()["items"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        assert seen == mine[::-1]  # newest first, each once

    async def test_a_forged_cursor_is_a_400_problem(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api)

        def forge(text: str) -> str:
            return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

        # Withdrawals page by (created_at, id); history by the ledger's entry sequence alone.
        timed = str(uuid4())
        by_time = [
            "%%%",
            "bm90IGEgY3Vyc29y",
            forge("2026-01-01T00:00:00+00:00|not-a-key"),
            forge(f"9999-12-31T23:59:59-14:00|{timed}"),  # past datetime's range
            forge(f"0001-01-01T00:00:00+14:00|{timed}"),
            forge(f"2026-01-01T00:00:00|{timed}"),  # naive
        ]
        by_sequence = [
            "%%%",
            "bm90IGEgY3Vyc29y",
            forge("not-a-key"),
            forge("9" * 30),  # past BIGINT
            forge("\u00b2"),  # a digit to isdigit(), not int()
            forge("-5"),
            forge("2026-01-01T00:00:00+00:00|5"),  # the old (created_at, id) shape
        ]
        fine_time = forge(f"2026-01-01T00:00:00+00:00|{timed}")
        for path, who, forged, fine in (
            ("/api/v1/withdrawals", partner, by_time, fine_time),
            ("/api/admin/withdrawals", admin, by_time, fine_time),
            ("/api/v1/wallet/transactions", partner, by_sequence, forge("5")),
            ("/api/v1/earnings", partner, by_sequence, forge("5")),
        ):
            for cursor in forged:
                response = await api.get(path, params={"cursor": cursor}, headers=who.headers)
                assert response.status_code == 400, (path, cursor, response.text)
                assert response.headers["content-type"] == "application/problem+json"
            response = await api.get(path, params={"cursor": fine}, headers=who.headers)
            assert response.status_code == 200, (path, response.text)


class TestHostileAdminInput:
    """What an attacker with an admin password (no second factor), or an honest admin's
    typo, must not be able to do to the money (found by an adversarial review)."""

    async def test_revenue_events_need_a_second_factor(
        self, wallet_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        password_only = await make_partner(wallet_app, api, role="admin")
        event = {"id": f"nomfa-{uuid4()}", "kind": "game", "profit": 1_000}
        response = await api.post(
            "/api/v1/revenue-events", json=event, headers=password_only.headers
        )
        assert response.status_code == 403, response.text
        assert response.json()["mfa_required"] is True

    async def test_a_profit_past_the_bound_is_refused_whole(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        """One event near 2⁶³ used to be accepted, overflow the revenue account and stop
        every later earnings batch for good."""
        bound = runtime_of(wallet_app).settings.WALLET_REVENUE_EVENT_MAX
        for profit in (bound + 1, -bound - 1, 2**63 - 1):
            event_id = f"huge-{uuid4()}"
            response = await api.post(
                "/api/v1/revenue-events",
                json={"id": event_id, "kind": "game", "profit": profit},
                headers=admin.headers,
            )
            assert response.status_code == 422, (profit, response.text)
            async with runtime_of(wallet_app).db.session() as session:
                found = await session.execute(
                    text("SELECT 1 FROM wallet_revenue_events WHERE id = :i"), {"i": event_id}
                )
                assert found.first() is None
        at_bound = {"id": f"big-{uuid4()}", "kind": "game", "profit": bound}
        asked = await api.post("/api/v1/revenue-events", json=at_bound, headers=admin.headers)
        assert asked.status_code == 202, asked.text  # above APPROVAL_THRESHOLD (ADR 0059)
        approved = await api.post(
            f"/api/admin/approvals/{asked.json()['approval']['id']}/approve",
            headers=second_admin.headers,
        )
        assert approved.status_code == 200, approved.text
        assert approved.json()["result"] == {"created": True}

    async def test_nul_characters_are_422_and_write_nothing(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        withdrawal_id = (await withdraw(api, partner, 1_000)).json()["id"]
        replies = [
            await api.post(
                f"/api/admin/withdrawals/{withdrawal_id}/reject",
                json={"reason": "a\x00b"},
                headers=admin.headers,
            ),
            await api.post(
                "/api/v1/revenue-events",
                json={"id": f"e\x00{uuid4()}", "kind": "game", "profit": 5},
                headers=admin.headers,
            ),
            await api.post(
                "/api/v1/revenue-events",
                json={"id": f"nul-kind-{uuid4()}", "kind": "g\x00", "profit": 5},
                headers=admin.headers,
            ),
        ]
        for reply in replies:
            assert reply.status_code == 422, reply.text
            assert reply.headers["content-type"] == "application/problem+json"
        still = await api.get(f"/api/v1/withdrawals/{withdrawal_id}", headers=partner.headers)
        assert still.json()["status"] == "pending"
        await assert_invariants(wallet_app)

    async def test_a_repeated_decision_is_audited_once(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        partner = await funded_partner(wallet_app, api)
        withdrawal_id = (await withdraw(api, partner, 1_000)).json()["id"]
        for _ in range(3):
            approved = await api.post(
                f"/api/admin/withdrawals/{withdrawal_id}/approve", headers=admin.headers
            )
            assert approved.status_code == 200
        batch = await api.post(
            "/api/admin/withdrawals/batch-approve",
            json={"ids": [withdrawal_id]},
            headers=admin.headers,
        )
        assert batch.json()["approved"] == 1
        async with runtime_of(wallet_app).db.session() as session:
            audited = await session.scalar(
                text("SELECT count(*) FROM audit_log WHERE subject_id = :i"), {"i": withdrawal_id}
            )
        assert audited == 1

    async def test_partners_cannot_work_out_the_real_profit(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        """shown = profit × share: with the share next to the shown profit, the real profit
        was one division away."""
        partner = await make_partner(wallet_app, api)
        await api.put(
            f"/api/admin/partners/{partner.id}", json={"share_bps": 3_333}, headers=admin.headers
        )
        event = {"id": f"game-{uuid4()}", "kind": "game", "profit": 98_765}
        assert (
            await api.post("/api/v1/revenue-events", json=event, headers=admin.headers)
        ).status_code == 201
        async with wallet_worker(runtime_of(wallet_app)):
            for _ in range(200):
                items = (await api.get("/api/v1/earnings", headers=partner.headers)).json()
                if items["items"]:
                    break
                await asyncio.sleep(0.05)
        (earning,) = items["items"]
        assert "share_bps" not in earning
        assert "profit" not in earning
        assert earning["shown_profit"] == 98_765 * 3_333 // 10_000


class TestLockOrder:
    async def test_admins_and_partners_racing_on_one_queue_never_deadlock(
        self, wallet_app: FastAPI, api: httpx.AsyncClient, admin: Caller
    ) -> None:
        """Two batch approvals in opposite orders, single approvals in a third order and
        partners requesting more withdrawals, all at once: every answer is a decision or a
        409, never a 500 (a batch used to take its locks item by item, interleaved, and
        PostgreSQL broke the resulting cycles as 'deadlock detected')."""
        partners = [await funded_partner(wallet_app, api, 1_000_000) for _ in range(4)]
        for _ in range(3):
            ids = [
                (await withdraw(api, partner, 1_000)).json()["id"]
                for partner in partners
                for _ in range(3)
            ]
            replies = await asyncio.gather(
                api.post(
                    "/api/admin/withdrawals/batch-approve", json={"ids": ids}, headers=admin.headers
                ),
                api.post(
                    "/api/admin/withdrawals/batch-approve",
                    json={"ids": ids[::-1]},
                    headers=admin.headers,
                ),
                *(
                    api.post(f"/api/admin/withdrawals/{i}/approve", headers=admin.headers)
                    for i in ids[1::2]
                ),
                *(withdraw(api, partner, 1_000) for partner in partners[::-1]),
            )
            statuses = [reply.status_code for reply in replies]
            assert set(statuses) <= {200, 201, 409}, [
                (r.status_code, r.text[:200]) for r in replies if r.status_code >= 500
            ]
            async with runtime_of(wallet_app).db.session() as session:
                decided = await session.scalars(
                    text("SELECT status FROM wallet_withdrawals WHERE id = ANY(:ids)"),
                    {"ids": ids},
                )
                assert set(decided) == {"approved"}  # each approved exactly once, by someone
        await assert_invariants(wallet_app)
