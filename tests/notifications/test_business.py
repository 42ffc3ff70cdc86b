"""The "operation finished" and "top-up credited" e-mails: queued in the transaction of the
state change, through the public paths of the operations and payments services, exactly once
per business event (a replayed webhook, a second decision or a rolled-back one queue
nothing more), delivered over SMTP, and subject to the user's preferences like every mail."""

from __future__ import annotations

import email
import json
import time
import uuid
from email import policy
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import select, text

from surge.identity.runtime import install_identity
from surge.identity.service import identity as identity_service
from surge.kit.runtime import Runtime
from surge.kit.security import webhooks
from surge.models.notifications import OutboxMessage
from surge.notifications.service import notifications as notifications_service
from surge.operations.service import NotInReview
from surge.operations.service import operations as operations_service
from surge.payments.service import topup as topup_service
from surge.sim.smtp import SmtpSimulator
from surge.wallet.funds import funds as funds_service
from tests.fixtures.factories import PASSWORD, unique_email
from tests.fixtures.payments import SIM_SECRET
from tests.notifications.conftest import email_worker, wait_status


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"PAYMENTS_WEBHOOK_SECRETS": SIM_SECRET}


async def reseller(runtime: Runtime, *, balance: int = 0) -> tuple[UUID, str]:
    address = unique_email("reseller")
    install_identity(runtime)  # the password hasher (what the app and worker build at start)
    async with runtime.db.session() as session:
        user = await identity_service.register(
            session, runtime, email=address, password=PASSWORD, role="reseller"
        )
        if balance:
            await funds_service.credit(
                session, user.id, amount=balance, currency=runtime.settings.WALLET_CURRENCY,
                key=f"test-credit:{user.id}", kind="topup", reference="test",
            )  # fmt: skip
    return user.id, address


async def mails(runtime: Runtime, user_id: UUID, template: str) -> list[OutboxMessage]:
    async with runtime.db.session() as session:
        rows = await session.scalars(
            select(OutboxMessage).where(
                OutboxMessage.user_id == user_id, OutboxMessage.template == template
            )
        )
        return list(rows)


def received_text(relay: SmtpSimulator, message_id: UUID) -> str:
    header = f"<{message_id}@"
    found = next(m for m in relay.messages if m.message_id and m.message_id.startswith(header))
    parsed = email.message_from_bytes(found.data, policy=policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None
    return f"{parsed['Subject']}\n{body.get_content()}"


# ---- top-up credited (payments) --------------------------------------------------------------
def intent_event(owner_id: UUID, amount: int, payment_id: str | None = None) -> dict[str, Any]:
    payment_id = payment_id or f"pi_test_{uuid.uuid4().hex[:10]}"
    obj = {
        "id": payment_id, "object": "payment_intent", "amount": amount,
        "amount_received": amount, "currency": "usd", "status": "succeeded",
        "metadata": {"topup_id": str(uuid.uuid4()), "owner_id": str(owner_id)},
    }  # fmt: skip
    return {
        "id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "payment_intent.succeeded",
        "created": int(time.time()), "data": {"object": obj},
    }  # fmt: skip


async def deliver(runtime: Runtime, event: dict[str, Any]) -> None:
    """The webhook's transaction, then the processing job's: the payments service's own path."""
    body = json.dumps(event).encode()
    async with runtime.db.session() as session:
        await topup_service.receive_event(
            session, runtime, body=body,
            signature=webhooks.header([SIM_SECRET], body, int(time.time())),
        )  # fmt: skip
    async with runtime.db.session() as session:
        await topup_service.process_events(
            session, runtime, payment_id=event["data"]["object"]["id"]
        )


class TestTopupCredited:
    async def test_queued_once_with_the_credit_and_not_on_replay(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        owner, _ = await reseller(rt)
        event = intent_event(owner, 1_250)
        await deliver(rt, event)
        await deliver(rt, event)  # the same event id again: refused by the inbox
        # Another event for the same payment (a provider retry under a new id, a
        # reconciliation): the ledger posting exists, so nothing is credited or mailed again.
        again = intent_event(owner, 1_250, payment_id=event["data"]["object"]["id"])
        again["data"]["object"]["metadata"] = event["data"]["object"]["metadata"]
        await deliver(rt, again)
        [mail] = await mails(rt, owner, "topup_credited")
        assert mail.category == "payments"
        async with email_worker(rt):
            row = await wait_status(rt, mail.id)
        assert row.status == "sent", row.last_error
        content = received_text(relay, mail.id)
        assert "Your top-up of 12.50 USD was credited" in content

    async def test_a_rolled_back_credit_queues_nothing(self, rt: Runtime) -> None:
        owner, _ = await reseller(rt)
        event = intent_event(owner, 900)
        body = json.dumps(event).encode()
        async with rt.db.session() as session:
            await topup_service.receive_event(
                session, rt, body=body,
                signature=webhooks.header([SIM_SECRET], body, int(time.time())),
            )  # fmt: skip
        payment_id = event["data"]["object"]["id"]

        async def credit_then_fail() -> None:
            async with rt.db.session() as session:
                await topup_service.process_events(session, rt, payment_id=payment_id)
                assert len(await _pending_mails(session, owner)) == 1  # written in this tx
                raise RuntimeError("the job's transaction fails after the credit")

        with pytest.raises(RuntimeError):
            await credit_then_fail()
        assert await mails(rt, owner, "topup_credited") == []


async def _pending_mails(session: Any, owner: UUID) -> list[Any]:
    rows = await session.execute(
        text(
            "SELECT id FROM notification_messages WHERE user_id = :u AND template = 'topup_credited'"
        ),
        {"u": owner},
    )
    return list(rows)


# ---- operation finished (operations) ---------------------------------------------------------
async def operation_in_review(runtime: Runtime, owner: UUID) -> UUID:
    """An operation whose call was sent and whose answer was lost: an admin decides it."""
    async with runtime.db.session() as session:
        operation = await operations_service.create(
            session, runtime, owner, kind="signal", card="4111111111111111"
        )
        operation_id = operation.id
    async with runtime.db.session() as session:
        await session.execute(
            text("UPDATE operations SET status = 'needs_review', sent_at = now() WHERE id = :i"),
            {"i": operation_id},
        )
        await session.execute(
            text("DELETE FROM jobs WHERE dedup_key = :k"), {"k": f"op:{operation_id}"}
        )
    return operation_id


class TestOperationFinished:
    async def test_queued_once_per_operation_whatever_the_outcome(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        owner, _ = await reseller(rt, balance=10_000)
        performed = await operation_in_review(rt, owner)
        refused = await operation_in_review(rt, owner)
        async with rt.db.session() as session:
            await operations_service.resolve(session, rt, owner, performed, performed=True)
        async with rt.db.session() as session:
            await operations_service.resolve(session, rt, owner, refused, performed=False)
        with pytest.raises(NotInReview):  # a second decision is refused: no second mail
            async with rt.db.session() as session:
                await operations_service.resolve(session, rt, owner, performed, performed=False)
        found = {m.context["operation_id"]: m for m in await mails(rt, owner, "operation_finished")}
        assert set(found) == {str(performed), str(refused)}
        assert found[str(performed)].context["status"] == "succeeded"
        assert found[str(refused)].context["status"] == "failed"
        async with email_worker(rt):
            row = await wait_status(rt, found[str(performed)].id)
        assert row.status == "sent", row.last_error
        assert f"Your operation {performed} succeeded" in received_text(relay, row.id)

    async def test_a_user_who_opted_out_of_operations_mail_is_skipped(self, rt: Runtime) -> None:
        owner, _ = await reseller(rt, balance=10_000)
        async with rt.db.session() as session:
            await notifications_service.set_preferences(session, rt, owner, {"operations": False})
        operation_id = await operation_in_review(rt, owner)
        async with rt.db.session() as session:
            await operations_service.resolve(session, rt, owner, operation_id, performed=True)
        [mail] = await mails(rt, owner, "operation_finished")
        async with email_worker(rt):
            row = await wait_status(rt, mail.id)
        assert row.status == "skipped"
