"""The console's four-eyes pages (ADR 0059): a large payout asked in the console is recorded,
shown on /admin/approvals, refused to its maker, and paid when a second operator approves."""

from __future__ import annotations

import re
import uuid

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from surge.identity.service import identity as identity_service
from surge.wallet.service import wallet as wallet_service
from tests.admin.test_console import signed_in
from tests.admin.test_console_money import effects, form_key_of
from tests.fixtures.factories import PASSWORD
from tests.identity.conftest import app_settings, id_app, id_settings
from tests.wallet.factories import fund

__all__ = ["app_settings", "id_app", "id_settings"]


async def large_withdrawal(app: FastAPI, amount: int = 600_000) -> uuid.UUID:
    runtime = app.state.runtime
    async with runtime.db.session() as session:
        user = await identity_service.register(
            session, runtime, email=f"four-eyes-{uuid.uuid4().hex[:8]}@example.com",
            password=PASSWORD, role="partner",
        )  # fmt: skip
        await fund(session, user.id, amount)
        made = await wallet_service.request_withdrawal(
            session, runtime, user.id, amount=amount, key=uuid.uuid4().hex
        )
        return made.id


async def confirmed(api: httpx.AsyncClient, path: str, csrf: str) -> httpx.Response:
    asked = await api.post(path, data={"csrf": csrf})
    assert asked.status_code == 200, asked.text
    fields = {"csrf": csrf, "confirm": "yes", "form_key": form_key_of(asked.text)}
    return await api.post(path, data=fields)


async def test_a_large_payout_needs_a_second_operator(
    id_app: FastAPI, api: httpx.AsyncClient
) -> None:
    maker_csrf = await signed_in(id_app, api)
    withdrawal_id = await large_withdrawal(id_app)
    asked = await confirmed(api, f"/admin/withdrawals/{withdrawal_id}/approve", maker_csrf)
    assert asked.status_code == 303, asked.text
    assert asked.headers["location"].startswith("/admin/approvals?flash=")
    assert await effects(id_app, withdrawal_id) == (0, 0)  # recorded, nothing paid
    async with id_app.state.runtime.db.session() as session:
        approval_id = await session.scalar(
            text("SELECT id FROM admin_approvals WHERE subject_id = :s AND status = 'pending'"),
            {"s": str(withdrawal_id)},
        )
    listed = await api.get("/admin/approvals")
    assert str(withdrawal_id) in listed.text
    assert f'id="approve-{approval_id}"' not in listed.text  # the maker gets no button
    own = await confirmed(api, f"/admin/approvals/{approval_id}/approve", maker_csrf)
    assert own.status_code == 403, own.text

    api.cookies.clear()  # the maker signs out of this browser
    checker_csrf = await signed_in(id_app, api)  # another operator
    listed = await api.get("/admin/approvals")
    assert re.search(f'id="approve-{approval_id}"', listed.text), listed.text[-3000:]
    done = await confirmed(api, f"/admin/approvals/{approval_id}/approve", checker_csrf)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/admin/approvals?flash=Request+approved"
    payouts, _ = await effects(id_app, withdrawal_id)
    assert payouts == 1
    async with id_app.state.runtime.db.session() as session:
        status = await session.scalar(
            text("SELECT status FROM wallet_withdrawals WHERE id = :i"), {"i": withdrawal_id}
        )
    assert status == "approved"
