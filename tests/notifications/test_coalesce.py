"""The send path's shared statements (ADR 0026, 0031): requests waiting at the same moment
go to PostgreSQL in one statement, each with its own answer."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

from surge.kit.runtime import Runtime
from surge.notifications.coalesce import Meeting, coalescer
from surge.notifications.service import notifications as notifications_service
from surge.sim.smtp import SmtpSimulator


async def queued(runtime: Runtime) -> UUID:
    async with runtime.db.session() as session:
        to = f"lane-{uuid4().hex[:10]}@example.com"
        return await notifications_service.send(
            session, template="welcome", context={"email": to}, category="account",
            key=f"test:{uuid4()}", to=to,
        )  # fmt: skip


class TestMarks:
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


class TestWaves:
    """A batch's wave (ADR 0040): the members' marks meet before the lane."""

    async def test_a_waves_marks_go_in_one_statement(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        lanes = coalescer(rt)
        messages = [await queued(rt) for _ in range(8)]
        meeting = Meeting(lanes.mark, linger=3600)
        for member in range(8):
            meeting.join(member)
        before = lanes.mark.batches
        futures = [meeting.submit(member, message) for member, message in enumerate(messages[:7])]
        assert lanes.mark.waiting == 0  # held until the eighth member has marked too
        futures.append(meeting.submit(7, messages[7]))
        # The lane sees them together: one statement, each member its own answer.
        assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [True] * 8
        assert lanes.mark.batches == before + 1

    async def test_held_marks_wait_for_every_member_with_a_connection(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        lanes = coalescer(rt)
        first, second = await queued(rt), await queued(rt)
        meeting = Meeting(lanes.mark, linger=3600)
        meeting.join(0)
        meeting.join(1)
        items = lanes.mark.items
        held = meeting.submit(0, first)
        assert lanes.mark.items == items
        assert lanes.mark.waiting == 0  # held by the meeting, not handed to the lane
        meeting.leave(1)  # the other member ended without a mark: the held one goes
        assert await asyncio.wait_for(held, 10) is True
        # A member that never joined (still waiting for a connection) holds nobody up.
        alone = Meeting(lanes.mark, linger=3600)
        assert await asyncio.wait_for(alone.submit(5, second), 10) is True

    async def test_a_member_that_hangs_delays_the_others_by_the_linger_only(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        lanes = coalescer(rt)
        message = await queued(rt)
        meeting = Meeting(lanes.mark, linger=0.05)
        meeting.join(0)
        meeting.join(1)  # joins and never marks (a relay hanging on its recipient)
        assert await asyncio.wait_for(meeting.submit(0, message), 10) is True
