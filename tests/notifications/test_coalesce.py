"""The send path's shared statements (ADR 0026, 0031): requests waiting at the same moment
go to PostgreSQL in one statement, each with its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from uuid import UUID, uuid4

from surge.kit.runtime import Runtime
from surge.notifications import repository
from surge.notifications.coalesce import Lane, Meeting, coalescer
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

    async def test_two_attempts_marking_in_two_statements_in_flight_elect_one_sender(
        self, rt: Runtime, relay: SmtpSimulator
    ) -> None:
        # ADR 0055: a mark that arrives while another statement is on the wire goes out in a
        # second one at once. Two attempts of one message split that way are kept apart by
        # PostgreSQL (the later UPDATE waits for the row, then finds it "sending"), not by
        # the lane: exactly one of them may send.
        engine = rt.db.primary

        async def mark(ids: Sequence[UUID]) -> dict[UUID, bool]:
            return dict.fromkeys(await repository.mark_sending_many(engine, ids, flush=False), True)

        # The process's mark lane, as NOTIFY_MARK_IN_FLIGHT=2 builds it.
        lane: Lane[UUID, bool] = Lane(mark, False, exclusive=True, in_flight=2)
        message = await queued(rt)
        first = lane.submit(message)
        await asyncio.sleep(0)  # the first statement has taken its batch and is on the wire
        assert lane.waiting == 0
        assert not first.done()
        second = lane.submit(message)
        await asyncio.sleep(0)
        assert lane.waiting == 0  # not waiting for the first answer: in flight too
        answers = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert sorted(answers) == [False, True]
        assert lane.batches == 2


class TestLane:
    """How many statements a lane keeps in flight (ADR 0055), with a stand-in statement
    that answers when told to."""

    async def test_a_second_statement_starts_while_the_first_is_in_flight(self) -> None:
        calls: list[list[int]] = []
        answers: list[asyncio.Event] = []

        async def run(keys: Sequence[int]) -> dict[int, int]:
            calls.append(list(keys))
            answered = asyncio.Event()
            answers.append(answered)
            await answered.wait()
            return {key: key * 10 for key in keys}

        lane: Lane[int, int] = Lane(run, 0, in_flight=2)
        one = [lane.submit(1), lane.submit(2)]  # same turn: one statement
        await asyncio.sleep(0)
        two = [lane.submit(3)]  # the first is in flight: a second statement at once
        await asyncio.sleep(0)
        three = [lane.submit(4), lane.submit(5)]  # both in flight: these wait, together
        await asyncio.sleep(0)
        assert calls == [[1, 2], [3]]
        assert lane.waiting == 2
        answers[1].set()  # the second answers first: its drainer takes what waits
        assert await asyncio.wait_for(asyncio.gather(*two), 10) == [30]
        await asyncio.sleep(0)
        assert calls == [[1, 2], [3], [4, 5]]
        answers[0].set()
        answers[2].set()
        assert await asyncio.wait_for(asyncio.gather(*one, *three), 10) == [10, 20, 40, 50]
        assert (lane.batches, lane.items) == (3, 5)

    async def test_one_in_flight_waits_for_the_answer(self) -> None:
        calls: list[list[int]] = []
        answered = asyncio.Event()

        async def run(keys: Sequence[int]) -> dict[int, int]:
            calls.append(list(keys))
            await answered.wait()
            return dict.fromkeys(keys, 1)

        lane: Lane[int, int] = Lane(run, 0)
        first = lane.submit(1)
        await asyncio.sleep(0)
        second = lane.submit(2)
        await asyncio.sleep(0)
        assert calls == [[1]]
        assert lane.waiting == 1
        answered.set()
        assert list(await asyncio.wait_for(asyncio.gather(first, second), 10)) == [1, 1]
        assert calls == [[1], [2]]


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
