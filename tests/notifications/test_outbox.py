"""The outbox against a real SMTP relay (aiosmtpd on loopback): delivery, every class of
refusal, retries with one final event, suppressions and the crash window."""

from __future__ import annotations

import email
from email import policy
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import select, text

from surge.kit.jobs import JobContext, enqueue
from surge.kit.runtime import Runtime
from surge.models.notifications import Suppression
from surge.notifications.batch import BatchSendingUseCases
from surge.notifications.service import SEND_JOB, message_id_header
from surge.notifications.service import notifications as notifications_service
from surge.sim.smtp import SmtpSimulator
from tests.fixtures.waiting import eventually
from tests.notifications.conftest import email_worker, events_of, status_of, wait_status


def address(prefix: str = "user") -> str:
    return f"{prefix}-{uuid4().hex[:10]}@example.com"


async def send(runtime: Runtime, to: str, **overrides: Any) -> UUID:
    values: dict[str, Any] = {
        "template": "withdrawal_decided",
        "context": {"amount": 12345, "currency": "USD", "status": "approved",
                    "reason": None, "withdrawal_id": "w-1"},
        "category": "wallet",
        "key": f"test:{uuid4()}",
        "to": to,
        **overrides,
    }  # fmt: skip
    async with runtime.db.session() as session:
        return await notifications_service.send(session, **values)


async def suppression(runtime: Runtime, to: str) -> Suppression | None:
    async with runtime.db.session() as session:
        return await session.scalar(select(Suppression).where(Suppression.address == to))


class TestDelivery:
    async def test_a_committed_message_arrives_once_with_its_message_id(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        user_id = uuid4()
        to = address()
        message_id = await send(rt, to, user_id=user_id)
        async with email_worker(rt):
            row = await wait_status(rt, message_id)
        assert row.status == "sent", row.last_error
        # A success is not an error: the relay's reply is in the 'sent' event, not last_error.
        assert row.last_error is None
        assert row.last_code == 250
        async with rt.db.session() as session:
            reply = await session.scalar(
                text("SELECT detail FROM notification_events "
                     "WHERE message_id = :m AND event = 'sent'"), {"m": message_id},
            )  # fmt: skip
        assert reply
        header = message_id_header(message_id, rt.settings)
        assert relay.relay.count(header) == 1
        received = next(m for m in relay.messages if m.message_id == header)
        assert received.rcpt_tos == [to]
        parsed = email.message_from_bytes(received.data, policy=policy.default)
        assert parsed["Subject"] == "Your withdrawal was approved"
        assert "123.45 USD" in parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert "/api/v1/notifications/unsubscribe?token=" in parsed["List-Unsubscribe"]
        assert await events_of(rt, message_id) == ["sent"]

    async def test_a_rolled_back_transaction_sends_nothing(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        key = f"test:{uuid4()}"

        async def business_change() -> None:
            async with rt.db.session() as session:
                await notifications_service.send(
                    session, template="welcome", context={"email": "x"}, category="account",
                    key=key, to=address(),
                )  # fmt: skip
                raise RuntimeError("the business change failed")

        with pytest.raises(RuntimeError):
            await business_change()
        async with rt.db.session() as session:
            rows = await session.scalar(
                text("SELECT count(*) FROM notification_messages WHERE key = :k"), {"k": key}
            )
            jobs = await session.scalar(
                text("SELECT count(*) FROM jobs WHERE name = :n AND state = 'queued'"),
                {"n": SEND_JOB},
            )
        assert rows == 0
        assert jobs == 0

    async def test_the_same_key_is_one_message(self, rt: Runtime, relay: SmtpSimulator) -> None:
        key = f"test:{uuid4()}"
        to = address()
        first = await send(rt, to, key=key)
        second = await send(rt, to, key=key)
        assert first == second
        async with email_worker(rt):
            await wait_status(rt, first)
        assert relay.relay.count(message_id_header(first, rt.settings)) == 1
        assert len([m for m in relay.messages if m.rcpt_tos == [to]]) == 1

    async def test_a_locale_falls_back_to_english(self, rt: Runtime, relay: SmtpSimulator) -> None:
        fr = await send(rt, address(), locale="fr")
        de = await send(rt, address(), locale="de")
        async with email_worker(rt):
            await wait_status(rt, fr)
            await wait_status(rt, de)
        assert (await status_of(rt, fr)).subject == "Votre retrait a été approuvé"
        assert (await status_of(rt, de)).subject == "Your withdrawal was approved"


class TestBatches:
    async def test_one_job_sends_the_ready_messages_of_the_others_and_finishes_their_jobs(
        self, rt: Runtime, relay: SmtpSimulator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ids = [await send(rt, address()) for _ in range(4)]
        bounced = await send(rt, address("bounce"))  # a claimed job's rare outcome
        ids.append(await send(rt, address()))
        calls: list[int] = []
        original = BatchSendingUseCases.send_job

        async def counted(self: BatchSendingUseCases, ctx: JobContext) -> None:
            calls.append(ctx.id)
            await original(self, ctx)

        monkeypatch.setattr(BatchSendingUseCases, "send_job", counted)

        async def job_states() -> list[str]:
            async with rt.db.session() as session:
                return list(
                    await session.scalars(
                        text("SELECT state FROM jobs WHERE name = :n "
                             "AND payload->>'message_id' = ANY(:ids)"),
                        {"n": SEND_JOB, "ids": [str(i) for i in [*ids, bounced]]},
                    )
                )  # fmt: skip

        async def all_succeeded() -> bool:
            return await job_states() == ["succeeded"] * 6

        async with email_worker(rt, concurrency=1):
            rows = [await wait_status(rt, id_) for id_ in [*ids, bounced]]
            # Every job of the batch is finished by the running worker (the claimed ones
            # by the batch's ack or their own transaction, its own by the engine's ack).
            await eventually(all_succeeded, timeout=20, message="a job of the batch unfinished")
        assert [r.status for r in rows] == ["sent"] * 5 + ["bounced"]
        assert len(calls) == 1  # one job took the five others with it
        for id_ in ids:
            assert relay.relay.count(message_id_header(id_, rt.settings)) == 1
            assert await events_of(rt, id_) == ["sent"]


class TestRefusals:
    async def test_550_is_a_hard_bounce_and_the_next_message_is_held(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        to = address("bounce")  # the relay answers 550 5.1.1 at RCPT
        first = await send(rt, to)
        async with email_worker(rt):
            row = await wait_status(rt, first)
            assert row.status == "bounced"
            assert row.last_code == 550
            found = await suppression(rt, to)
            assert found is not None
            assert found.reason == "hard_bounce"
            assert found.expires_at is None
            second = await send(rt, to)
            held = await wait_status(rt, second)
        assert held.status == "held"
        assert relay.messages == []
        assert await events_of(rt, first) == ["bounced"]
        assert await events_of(rt, second) == ["held"]

    async def test_lifting_a_suppression_resends_the_held_message(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        to = address()
        relay.relay.mode = "550"
        first = await send(rt, to)
        async with email_worker(rt):
            assert (await wait_status(rt, first)).status == "bounced"
            second = await send(rt, to)
            assert (await wait_status(rt, second)).status == "held"
            relay.relay.mode = "accept"  # the mailbox exists again
            async with rt.db.session() as session:
                lifted, requeued = await notifications_service.lift(session, None, to)
            assert lifted.reason == "hard_bounce"
            assert requeued == [second]
            row = await wait_status(rt, second, {"sent"})
        assert row.status == "sent"
        assert relay.relay.count(message_id_header(second, rt.settings)) == 1
        assert relay.relay.count(message_id_header(first, rt.settings)) == 0
        assert await suppression(rt, to) is None

    async def test_a_reputation_block_is_not_the_addresss_fault(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        relay.relay.mode = "5.7.1"
        to = address()
        message_id = await send(rt, to)
        async with email_worker(rt):
            row = await wait_status(rt, message_id)
        assert row.status == "blocked"
        assert row.last_error is not None
        assert "5.7.1" in row.last_error
        assert await suppression(rt, to) is None  # the address is fine: we are blocked
        assert await events_of(rt, message_id) == ["blocked"]

    async def test_450_is_retried_with_one_final_event(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        relay.relay.mode = "450"
        message_id = await send(rt, address())
        async with email_worker(rt):
            while (await status_of(rt, message_id)).attempts < 3:
                await wait_status(rt, message_id, {"queued"})
            relay.relay.mode = "accept"
            row = await wait_status(rt, message_id, {"sent"})
        assert row.attempts >= 4
        events = await events_of(rt, message_id)
        assert events[-1] == "sent"
        assert set(events[:-1]) == {"deferred"}  # per try, internal; one final event
        assert relay.relay.count(message_id_header(message_id, rt.settings)) == 1

    @pytest.mark.parametrize("settings_overrides", [{"NOTIFY_MAX_AGE": "PT1S"}])
    async def test_transient_failures_give_up_after_the_max_age(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        relay.relay.mode = "450"
        message_id = await send(rt, address())
        async with email_worker(rt):
            row = await wait_status(rt, message_id)
        assert row.status == "failed"
        assert row.last_error is not None
        assert row.last_error.startswith("gave up after")
        assert (await events_of(rt, message_id)).count("failed") == 1

    async def test_a_hanging_relay_times_out_and_the_message_goes_later(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        relay.relay.mode = "hang"
        message_id = await send(rt, address())
        async with email_worker(rt):
            while (await status_of(rt, message_id)).attempts < 1:
                await wait_status(rt, message_id, {"queued"})
            relay.relay.mode = "accept"
            row = await wait_status(rt, message_id, {"sent"})
        assert row.status == "sent"
        assert relay.relay.count(message_id_header(message_id, rt.settings)) == 1
        assert await events_of(rt, message_id) == ["sent"]  # a hang is not a soft bounce

    @pytest.mark.parametrize("settings_overrides", [{"NOTIFY_SOFT_BOUNCE_LIMIT": 3}])
    async def test_repeated_soft_bounces_suppress_for_a_while(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        to = address("defer")  # 450 4.2.1 at RCPT, every time
        message_id = await send(rt, to)
        async with email_worker(rt):
            row = await wait_status(rt, message_id)
        assert row.status == "held"
        found = await suppression(rt, to)
        assert found is not None
        assert found.reason == "soft_bounces"
        assert found.expires_at is not None


class TestCrashWindow:
    async def test_a_message_marked_sending_by_a_dead_attempt_is_never_resent(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        """The worker wrote the end of DATA and died before the reply: the next attempt
        finds ``sending`` and records ``unconfirmed`` instead of sending it again."""
        message_id = await send(rt, address())
        async with rt.db.session() as session:  # the dead attempt's job, taken over
            await session.execute(text("DELETE FROM jobs WHERE payload->>'message_id' = :m"),
                                  {"m": str(message_id)})  # fmt: skip
        assert await notifications_service.mark_sending(rt, message_id)  # what it left behind
        async with rt.db.session() as session:
            await enqueue(session, SEND_JOB, {"message_id": str(message_id)})
        async with email_worker(rt):
            row = await wait_status(rt, message_id)
        assert row.status == "unconfirmed"
        assert relay.messages == []
        assert await events_of(rt, message_id) == ["unconfirmed"]

    async def test_a_lost_reply_after_the_end_of_data_is_unconfirmed_not_retried(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        relay.relay.hold()  # the relay keeps the message but never says 250 (timeout 1 s)
        message_id = await send(rt, address())
        async with email_worker(rt):
            row = await wait_status(rt, message_id)
            relay.relay.release()
        assert row.status == "unconfirmed"
        assert relay.relay.count(message_id_header(message_id, rt.settings)) == 1


class TestPreferences:
    async def test_an_opted_out_category_is_skipped_but_security_mail_goes(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        user_id = uuid4()
        to = address()
        async with rt.db.session() as session:
            await notifications_service.set_preferences(
                session, rt, user_id, {"wallet": False, "security": False}
            )
        wallet = await send(rt, to, user_id=user_id)
        security = await send(
            rt, to, user_id=user_id, template="new_device", category="security",
            context={"ip": "203.0.113.9", "user_agent": "curl"},
        )  # fmt: skip
        async with email_worker(rt):
            assert (await wait_status(rt, wallet)).status == "skipped"
            assert (await wait_status(rt, security)).status == "sent"
        sent = next(m for m in relay.messages if m.rcpt_tos == [to])
        assert b"List-Unsubscribe" not in sent.data  # security mail has no opt-out

    async def test_the_unsubscribe_token_turns_its_category_off(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        user_id = uuid4()
        token = notifications_service.unsubscribe_token(rt.settings, user_id, "wallet")
        async with rt.db.session() as session:
            assert await notifications_service.unsubscribe(session, rt, token) == "wallet"
            prefs = await notifications_service.preferences(session, rt, user_id)
        assert prefs == {"wallet": False, "security": True}


class TestRates:
    @pytest.mark.parametrize("settings_overrides", [{"NOTIFY_RATE_MIN_SENT": 1}])
    async def test_rates_become_gauges(self, rt: Runtime, relay: SmtpSimulator) -> None:
        from prometheus_client import REGISTRY

        from surge.notifications.service import check_rates

        async with rt.db.session() as session:
            rates = await check_rates(session, rt)
        assert rates.sent >= 0
        assert REGISTRY.get_sample_value("surge_notify_window_sent") == rates.sent
        assert REGISTRY.get_sample_value("surge_notify_bounce_rate") == rates.bounce_rate
