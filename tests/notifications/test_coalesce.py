"""The send path's shared statements (ADR 0026, 0031): marks and "sent" outcomes waiting at
the same moment go to PostgreSQL in one statement, each with its own answer."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

from surge.kit.runtime import Runtime
from surge.notifications.coalesce import coalescer
from surge.notifications.service import notifications as notifications_service
from surge.sim.smtp import SmtpSimulator
from tests.notifications.conftest import events_of, status_of


async def queued(runtime: Runtime) -> UUID:
    async with runtime.db.session() as session:
        to = f"lane-{uuid4().hex[:10]}@example.com"
        return await notifications_service.send(
            session, template="welcome", context={"email": to}, category="account",
            key=f"test:{uuid4()}", to=to,
        )  # fmt: skip


class TestSharedWrites:
    async def test_a_mark_and_an_outcome_share_one_statement(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        lanes = coalescer(rt)
        first, second = await queued(rt), await queued(rt)
        assert await lanes.mark(first)
        before = lanes.writes.batches

        mark = lanes.mark.submit(second)
        sent = lanes.sent.submit((first, 250, "250 OK queued", "Welcome"))
        assert list(await asyncio.gather(mark, sent)) == [True, True]

        assert lanes.writes.batches == before + 1
        assert (await status_of(rt, second)).status == "sending"
        row = await status_of(rt, first)
        assert (row.status, row.last_code, row.subject) == ("sent", 250, "Welcome")
        assert await events_of(rt, first) == ["sent"]
        assert await events_of(rt, second) == []

    async def test_a_mark_beside_its_own_messages_outcome_loses(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        lanes = coalescer(rt)
        message = await queued(rt)
        assert await lanes.mark(message)

        late = lanes.mark.submit(message)  # another attempt of the same message
        sent = lanes.sent.submit((message, 250, "250 OK", None))
        assert list(await asyncio.gather(late, sent)) == [False, True]
        assert (await status_of(rt, message)).status == "sent"

    async def test_two_attempts_marking_in_one_statement_elect_one_sender(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        # Two jobs of one message in one process (the sweeper's duplicate, a stalled job
        # taken again) reaching the mark together: the statement sees one id, and only one
        # of them may be told it owns the message (both were, before: two copies).
        lanes = coalescer(rt)
        message = await queued(rt)
        assert list(await asyncio.gather(lanes.mark(message), lanes.mark(message))) == [
            True,
            False,
        ]
        assert not await lanes.mark(message)  # a later attempt: the row is already sending
