"""The console's money forms: each rendered confirmation carries its own key, so a
double-submit (double click, resubmitted page, back button) is one effect (ADR 0035)."""

from __future__ import annotations

import re
import uuid

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from surge.identity.service import identity as identity_service
from surge.wallet.funds import funds as funds_service
from surge.wallet.ledger import ledger
from surge.wallet.service import wallet as wallet_service
from tests.admin.test_console import signed_in
from tests.fixtures.factories import PASSWORD
from tests.identity.conftest import app_settings, id_app, id_settings
from tests.wallet.factories import fund

__all__ = ["app_settings", "id_app", "id_settings"]


def form_key_of(html: str) -> str:
    found = re.search(r'name="form_key" value="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


async def pending_withdrawal(app: FastAPI, amount: int = 3_000) -> uuid.UUID:
    runtime = app.state.runtime
    async with runtime.db.session() as session:
        user = await identity_service.register(
            session, runtime, email=f"console-money-{uuid.uuid4().hex[:8]}@example.com",
            password=PASSWORD, role="partner",
        )  # fmt: skip
        await fund(session, user.id, 10_000)
        made = await wallet_service.request_withdrawal(
            session, runtime, user.id, amount=amount, key=uuid.uuid4().hex
        )
        await session.commit()
        return made.id


async def effects(app: FastAPI, withdrawal_id: uuid.UUID) -> tuple[int, int]:
    """(ledger payouts, audit rows) recorded for this withdrawal."""
    async with app.state.runtime.db.session() as session:
        payouts = await session.scalar(
            text("SELECT count(*) FROM wallet_transfers WHERE idempotency_key = :k"),
            {"k": f"withdrawal:{withdrawal_id}:payout"},
        )
        audits = await session.scalar(
            text("SELECT count(*) FROM audit_log WHERE subject_id = :s"),
            {"s": str(withdrawal_id)},
        )
    return int(payouts or 0), int(audits or 0)


class TestDoubleSubmit:
    async def test_each_rendered_confirmation_has_its_own_key(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api)
        withdrawal_id = await pending_withdrawal(id_app)
        path = f"/admin/withdrawals/{withdrawal_id}/approve"
        first = await api.post(path, data={"csrf": csrf})
        second = await api.post(path, data={"csrf": csrf})
        assert form_key_of(first.text) != form_key_of(second.text)

    async def test_a_double_submitted_approval_is_one_effect(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api)
        withdrawal_id = await pending_withdrawal(id_app)
        path = f"/admin/withdrawals/{withdrawal_id}/approve"
        asked = await api.post(path, data={"csrf": csrf})
        fields = {"csrf": csrf, "confirm": "yes", "form_key": form_key_of(asked.text)}
        replies = [await api.post(path, data=fields) for _ in range(3)]
        assert [r.status_code for r in replies] == [303, 303, 303]
        assert {r.headers["location"] for r in replies} == {
            "/admin/withdrawals?flash=Withdrawal+approved"
        }
        assert await effects(id_app, withdrawal_id) == (1, 1)

    async def test_a_confirmed_money_form_without_its_key_is_refused(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api)
        withdrawal_id = await pending_withdrawal(id_app)
        for verb, extra in (("approve", {}), ("reject", {"reason": "no"})):
            refused = await api.post(
                f"/admin/withdrawals/{withdrawal_id}/{verb}",
                data={"csrf": csrf, "confirm": "yes", **extra},
            )
            assert refused.status_code == 428, refused.text
        batch = await api.post(
            "/admin/withdrawals/batch",
            data={"csrf": csrf, "confirm": "yes", "ids": str(withdrawal_id)},
        )
        assert batch.status_code == 428
        assert await effects(id_app, withdrawal_id) == (0, 0)


class TestDebt:
    """A partner whose chargeback it could not cover (ADR 0042): the queue shows the debt,
    lists the wallet, and the console's approval pays nothing out."""

    async def test_the_queue_shows_the_debt_and_approval_pays_nothing(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api)
        withdrawal_id = await pending_withdrawal(id_app, amount=10_000)
        runtime = id_app.state.runtime
        async with runtime.db.session() as session:
            owner = await session.scalar(
                text("SELECT owner_id FROM wallet_withdrawals WHERE id = :w"),
                {"w": withdrawal_id},
            )
            email = await session.scalar(
                text("SELECT email FROM users WHERE id = :o"), {"o": owner}
            )
            # A chargeback of 1 234 the wallet cannot cover: all 10 000 is reserved.
            await funds_service.reverse(
                session, owner, amount=1_234, currency="USD",
                key=f"payment:pi_{uuid.uuid4().hex}:dispute:dp_1", kind="topup_dispute",
            )  # fmt: skip
            await session.commit()
        page = await api.get("/admin/withdrawals")
        assert page.status_code == 200
        debts = page.text[page.text.index('id="debts"') : page.text.index("<h2>System")]
        assert email in debts
        assert "12.34" in debts
        # The platform's accounts summed over their stripes (ADR 0058): holds (the pending
        # withdrawal's reservation) and payments (the top-ups) among them.
        system = page.text[page.text.index('id="system-accounts"') :]
        assert "<td>holds</td>" in system
        assert "<td>payments</td>" in system
        path = f"/admin/withdrawals/{withdrawal_id}/approve"
        asked = await api.post(path, data={"csrf": csrf})
        fields = {"csrf": csrf, "confirm": "yes", "form_key": form_key_of(asked.text)}
        refused = await api.post(path, data=fields)
        assert refused.status_code in (303, 409), refused.text
        assert await effects(id_app, withdrawal_id) == (0, 0)
        async with runtime.db.session() as session:
            assert await ledger.check_invariants(session) == []
