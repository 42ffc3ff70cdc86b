"""The notifications API and the business events wired to it: the signed webhook (complaint,
forgery, redelivery), RFC 3464 DSN intake, admin suppressions and messages, and the welcome,
new-device and withdrawal e-mails reaching the relay."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text

from surge.config import Settings
from surge.identity.service import identity as identity_service
from surge.models.notifications import OutboxMessage, Suppression
from surge.notifications.dsn import parse_dsn
from surge.notifications.service import message_id_header
from surge.notifications.service import notifications as notifications_service
from surge.sim.smtp import SmtpSimulator
from surge.wallet.jobs import notify_withdrawal  # noqa: F401  (registers wallet jobs)
from tests.fixtures.clients import app_client, runtime_of
from tests.fixtures.factories import PASSWORD, bearer, login, make_admin, unique_email
from tests.notifications.conftest import email_worker, wait_status
from tests.wallet.conftest import wallet_worker
from tests.wallet.factories import fund


@pytest.fixture
async def napp(notify_config: Settings) -> FastAPI:
    from surge.app import create_app

    return create_app(notify_config)


@pytest.fixture
async def api(napp: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(napp):
        yield client


def signed(settings: Settings, body: bytes, stamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if stamp is None else stamp
    return {
        "Surge-Signature": notifications_service.webhook_signature(settings, body, stamp),
        "Content-Type": "application/json",
    }


async def suppression(app: FastAPI, address: str) -> Suppression | None:
    async with runtime_of(app).db.session() as session:
        return await session.scalar(select(Suppression).where(Suppression.address == address))


async def messages_to(app: FastAPI, address: str) -> list[OutboxMessage]:
    async with runtime_of(app).db.session() as session:
        rows = await session.scalars(
            select(OutboxMessage).where(OutboxMessage.to_address == address)
        )
        return list(rows)


def dsn(recipient: str, status: str, diagnostic: str, original: UUID) -> bytes:
    """A bounce report as Postfix mails it (RFC 3464), with the original headers."""
    boundary = "dsn-boundary-1"
    return (
        "From: MAILER-DAEMON@relay.example\r\nTo: bounces@surge.localhost\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        f"\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\nThe message could not be delivered.\r\n"
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; relay.example\r\nArrival-Date: Sun, 6 Dec 2026 22:00:00 +0000\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        f"\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: <{original}@surge.localhost>\r\nTo: {recipient}\r\nSubject: hello\r\n"
        f"\r\n--{boundary}--\r\n"
    ).encode()


class TestWebhook:
    async def test_a_complaint_suppresses_the_address(
        self, napp: FastAPI, api: httpx.AsyncClient
    ) -> None:
        to = f"reader-{uuid4().hex[:8]}@example.com"
        body = json.dumps({"events": [{"id": f"evt-{uuid4()}", "type": "complained",
                                       "recipient": to.upper()}]}).encode()  # fmt: skip
        settings = runtime_of(napp).settings
        response = await api.post(
            "/api/v1/webhooks/email", content=body, headers=signed(settings, body)
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"applied": 1, "duplicates": 0}
        found = await suppression(napp, to)
        assert found is not None
        assert (found.reason, found.source, found.expires_at) == ("complaint", "webhook", None)
        again = await api.post(
            "/api/v1/webhooks/email", content=body, headers=signed(settings, body)
        )
        assert again.json() == {"applied": 0, "duplicates": 1}  # a redelivery: one effect

    @pytest.mark.parametrize("forgery", ["missing", "wrong", "stale", "tampered"])
    async def test_a_forged_webhook_is_refused(
        self, napp: FastAPI, api: httpx.AsyncClient, forgery: str
    ) -> None:
        to = f"victim-{uuid4().hex[:8]}@example.com"
        body = json.dumps({"events": [{"id": f"evt-{uuid4()}", "type": "complained",
                                       "recipient": to}]}).encode()  # fmt: skip
        settings = runtime_of(napp).settings
        headers = signed(settings, body)
        if forgery == "missing":
            headers.pop("Surge-Signature")
        elif forgery == "wrong":
            headers["Surge-Signature"] = headers["Surge-Signature"][:-4] + "0000"
        elif forgery == "stale":
            headers = signed(settings, body, stamp=int(time.time()) - 3600)
        else:
            body = body.replace(b"victim", b"victin")
        response = await api.post("/api/v1/webhooks/email", content=body, headers=headers)
        assert response.status_code == 401, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert await suppression(napp, to) is None
        assert await suppression(napp, to.replace("victim", "victin")) is None

    async def test_a_dsn_hard_bounce_marks_the_message_and_suppresses(
        self, napp: FastAPI, api: httpx.AsyncClient, relay: SmtpSimulator
    ) -> None:
        runtime = runtime_of(napp)
        to = f"gone-{uuid4().hex[:8]}@example.com"
        async with runtime.db.session() as session:
            message_id = await notifications_service.send(
                session, to=to, template="welcome", context={"email": to},
                category="account", key=f"t:{uuid4()}",
            )  # fmt: skip
        async with email_worker(runtime):
            assert (await wait_status(runtime, message_id)).status == "sent"
        raw = dsn(
            to, "5.1.1", "550 5.1.1 <x>: Recipient address rejected: User unknown", message_id
        )
        [parsed] = parse_dsn(raw)
        assert (parsed.address, parsed.action, parsed.status, parsed.code) == (
            to,
            "failed",
            "5.1.1",
            550,
        )
        assert parsed.original_message_id == str(message_id)
        headers = {**signed(runtime.settings, raw), "Content-Type": "message/rfc822"}
        response = await api.post("/api/v1/webhooks/email/dsn", content=raw, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["applied"] == 1
        [row] = await messages_to(napp, to)
        assert row.status == "bounced"
        found = await suppression(napp, to)
        assert found is not None
        assert (found.reason, found.source) == ("hard_bounce", "dsn")

    async def test_a_dsn_reputation_block_does_not_suppress(
        self, napp: FastAPI, api: httpx.AsyncClient
    ) -> None:
        runtime = runtime_of(napp)
        to = f"fine-{uuid4().hex[:8]}@example.com"
        raw = dsn(to, "5.7.1", "550 5.7.1 Message rejected due to IP reputation", uuid4())
        headers = {**signed(runtime.settings, raw), "Content-Type": "message/rfc822"}
        response = await api.post("/api/v1/webhooks/email/dsn", content=raw, headers=headers)
        assert response.status_code == 200, response.text
        assert await suppression(napp, to) is None


class TestAdmin:
    async def test_list_and_lift_suppressions_audited_and_resending_held_mail(
        self, napp: FastAPI, api: httpx.AsyncClient, relay: SmtpSimulator
    ) -> None:
        runtime = runtime_of(napp)
        _, tokens, _ = await make_admin(napp, api)
        admin = bearer(tokens)
        to = f"held-{uuid4().hex[:8]}@example.com"
        created = await api.post("/api/admin/suppressions", json={"address": to, "detail": "asked"},
                                 headers=admin)  # fmt: skip
        assert created.status_code == 201, created.text
        assert created.json()["reason"] == "manual"
        async with runtime.db.session() as session:
            held_id = await notifications_service.send(
                session, to=to, template="welcome", context={"email": to},
                category="account", key=f"t:{uuid4()}",
            )  # fmt: skip
        async with email_worker(runtime):
            assert (await wait_status(runtime, held_id)).status == "held"
            page = await api.get("/api/admin/suppressions", params={"limit": 100}, headers=admin)
            assert page.status_code == 200
            assert to in [item["address"] for item in page.json()["items"]]
            lifted = await api.delete(f"/api/admin/suppressions/{to}", headers=admin)
            assert lifted.status_code == 200, lifted.text
            assert lifted.json() == {"address": to, "reason": "manual", "requeued": 1}
            assert (await wait_status(runtime, held_id, {"sent"})).status == "sent"
        assert relay.relay.count(message_id_header(held_id, runtime.settings)) == 1
        again = await api.delete(f"/api/admin/suppressions/{to}", headers=admin)
        assert again.status_code == 404
        async with runtime.db.session() as session:
            actions = list(await session.scalars(text(
                "SELECT action FROM audit_log WHERE subject_id = :a ORDER BY id"), {"a": to}))  # fmt: skip
        assert actions == ["notifications.suppression.add", "notifications.suppression.lift"]
        listed = await api.get("/api/admin/messages", params={"limit": 5}, headers=admin)
        assert listed.status_code == 200
        assert any(item["id"] == str(held_id) for item in listed.json()["items"])
        rates = await api.get("/api/admin/notifications/rates", headers=admin)
        assert rates.status_code == 200
        assert rates.json()["sent"] >= 1

    async def test_message_pages_lose_nothing_when_messages_share_a_timestamp(
        self, napp: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """Messages queued in one transaction share ``created_at`` (its ``now()``): paging by
        the timestamp alone skipped the rest of a page's tie; the key is (created_at, id)."""
        runtime = runtime_of(napp)
        _, tokens, _ = await make_admin(napp, api)
        admin = bearer(tokens)
        tag = uuid4().hex[:8]
        async with runtime.db.session() as session:
            queued = {
                str(await notifications_service.send(
                    session, to=f"tie-{tag}-{n}@example.com", template="welcome",
                    context={"email": "x"}, category="account", key=f"tie:{tag}:{n}",
                ))
                for n in range(5)
            }  # fmt: skip
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(100):
            params: dict[str, str | int] = {"limit": 2, "status": "queued"}
            if cursor:
                params["cursor"] = cursor
            page = await api.get("/api/admin/messages", params=params, headers=admin)
            assert page.status_code == 200, page.text
            seen += [item["id"] for item in page.json()["items"]]
            cursor = page.json()["next_cursor"]
            if not cursor:
                break
        assert queued <= set(seen)
        assert len(seen) == len(set(seen))  # nothing twice either

    async def test_admin_routes_need_an_mfa_admin(
        self, napp: FastAPI, api: httpx.AsyncClient
    ) -> None:
        assert (await api.get("/api/admin/suppressions")).status_code == 401
        assert (await api.get("/api/admin/messages")).status_code == 401


class TestBusinessEvents:
    async def test_sign_up_and_a_new_device_send_their_mails(
        self, napp: FastAPI, api: httpx.AsyncClient, relay: SmtpSimulator
    ) -> None:
        email = unique_email("signup")
        response = await api.post(
            "/api/v1/auth/register", json={"email": email, "password": PASSWORD}
        )
        assert response.status_code == 202, response.text  # the same for every address
        await login(api, email)  # the first sign-in: not a new device
        await api.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD},
                       headers={"User-Agent": "NewPhone/1.0"})  # fmt: skip
        runtime = runtime_of(napp)
        rows = await messages_to(napp, email)
        assert sorted(r.template for r in rows) == ["new_device", "welcome"]
        async with email_worker(runtime):
            for row in rows:
                assert (await wait_status(runtime, row.id)).status == "sent"
        subjects = sorted(m.subject for m in relay.messages if m.rcpt_tos == [email])
        assert subjects == ["New sign-in to your Surge account", "Welcome to Surge"]

    async def test_registering_a_taken_address_mails_its_owner(
        self, napp: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """Issue 16: the caller gets the same 202; the owner gets an e-mail, once a day."""
        email = unique_email("taken")
        body = {"email": email, "password": PASSWORD}
        first = await api.post("/api/v1/auth/register", json=body)
        again = await api.post("/api/v1/auth/register", json={**body, "email": email.upper()})
        third = await api.post("/api/v1/auth/register", json=body)
        assert first.status_code == again.status_code == third.status_code == 202
        assert first.json() == again.json()
        rows = await messages_to(napp, email)
        assert sorted(r.template for r in rows) == ["account_exists", "welcome"]

    async def test_a_decided_withdrawal_reaches_the_partner(
        self, napp: FastAPI, api: httpx.AsyncClient, relay: SmtpSimulator
    ) -> None:
        runtime = runtime_of(napp)
        _, tokens, _ = await make_admin(napp, api)
        email = unique_email("partner")
        async with runtime.db.session() as session:
            user = await identity_service.register(
                session, runtime, email=email, password=PASSWORD, role="partner"
            )
            await fund(session, user.id, 50_000)
        partner = bearer(await login(api, email))
        created = await api.post(
            "/api/v1/withdrawals", json={"amount": 12_500},
            headers={**partner, "Idempotency-Key": str(uuid4())},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        withdrawal_id = created.json()["id"]
        decided = await api.post(
            f"/api/admin/withdrawals/{withdrawal_id}/approve", headers=bearer(tokens)
        )
        assert decided.status_code == 200, decided.text
        async with wallet_worker(runtime), email_worker(runtime):
            deadline = time.monotonic() + 20
            while not [
                m for m in relay.messages if m.rcpt_tos == [email] and "withdrawal" in m.subject
            ]:
                assert time.monotonic() < deadline, "the withdrawal e-mail never arrived"
                await _tick()
        [mail] = [m for m in relay.messages if m.rcpt_tos == [email] and "withdrawal" in m.subject]
        assert mail.subject == "Your withdrawal was approved"
        assert b"125.00 USD" in mail.data
        assert withdrawal_id.encode() in mail.data


async def _tick() -> None:
    await asyncio.sleep(0.05)
