"""The send path's shared statements (ADR 0026, 0031): requests waiting at the same moment
go to PostgreSQL in one statement, each with its own answer."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

from surge.kit.runtime import Runtime
from surge.notifications.coalesce import coalescer
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
