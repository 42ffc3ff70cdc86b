"""A send job takes a batch (ADR 0031): its own message and up to ``NOTIFY_SEND_BATCH - 1``
other ready send jobs, claimed in one statement (``surge.kit.jobs.batch``); their rows read
in one statement; the messages sent one after another, each over a connection of the
process's SMTP pool (``NOTIFY_SMTP_CONNECTIONS``); the batch's jobs acked in one statement.

Per message nothing changes in the order of events (ADR 0019, 0026): its ``sending`` mark is
committed before its own end of DATA (the mark lane), its ``sent`` is submitted to the sent
lane the moment the relay's "250" is read — the job does not wait for it before starting the
next message, so a crash leaves an accepted message unrecorded for no longer than before —
and its job is acked only after its outcome is committed. What the batch shares is the job
engine's work (one claim, one ack, one read for many messages instead of one each).

The job's own message goes last, through the path of a single job (a rare outcome commits
with the job's completion), so no transaction of the job stays open while the others are
sent. A claimed job's rare outcome (held, skipped, deferred, bounced...) commits in its own
transaction together with that job's fenced completion. A message that raises is left to
its lease (the engine's stall recovery queues it again, and fails it after
``JOBS_MAX_STALLED`` stalls); the claimed jobs not started when the batch is cancelled are
released (not counted as attempts).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from uuid import UUID

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.jobs import JobContext
from surge.kit.jobs.batch import Claimed, ack, claim_more, complete_in, release, renew
from surge.kit.runtime import Runtime
from surge.notifications.coalesce import Meeting, Outcome, coalescer
from surge.notifications.metrics import EVENTS
from surge.notifications.sending import Prepared, SendingUseCases, Settle
from surge.notifications.smtp import Verdict

log = structlog.get_logger()

#: How long the held marks or ``sent`` records of a wave wait for a member still in its
#: conversation (a relay that hangs on one recipient delays the others by this, not by its
#: timeout).
WAVE_LINGER = 0.02


class BatchSendingUseCases(SendingUseCases):
    """The ``notifications.email.send`` job (``surge.notifications.jobs``)."""

    async def send_job(self, ctx: JobContext) -> None:
        runtime = ctx.runtime
        own = UUID(str(ctx.payload["message_id"]))
        claimed = await claim_more(ctx, runtime.settings.NOTIFY_SEND_BATCH - 1)
        if not claimed:
            await self._send_own(ctx, own, await self.prepare(runtime, own))
            return
        waiting = list(claimed)  # claimed, not started: released if the batch is cancelled
        keeper = asyncio.create_task(self._keep_leases(runtime, waiting))
        sent: list[tuple[Claimed, asyncio.Future[bool]]] = []
        done: list[Claimed] = []  # finished without a "sent" to wait for: acked at the end
        try:
            ids = [UUID(str(c.payload["message_id"])) for c in claimed]
            decisions = await self.prepare_many(runtime, [*ids, own])
            pairs = list(zip(claimed, ids, strict=True))
            width = max(1, runtime.settings.NOTIFY_SEND_WAVE)
            lanes = coalescer(runtime)
            # Waves of ``width`` messages; the job's own message is the last wave's last.
            for start in range(0, len(pairs) + 1, width):
                wave = pairs[start : start + width]
                last = start + width > len(pairs)
                for one, _ in wave:
                    waiting.remove(one)
                meet = (Meeting(lanes.mark, WAVE_LINGER), Meeting(lanes.sent, WAVE_LINGER))
                members: list[Awaitable[asyncio.Future[bool] | None]] = [
                    self._send_claimed(runtime, one, message, decisions[message], done,
                                       meet=meet, member=member)
                    for member, (one, message) in enumerate(wave)
                ]  # fmt: skip
                if last:
                    members.append(
                        self._send_own(ctx, own, decisions[own], meet=meet, member=len(wave))
                    )
                results = await asyncio.gather(*members, return_exceptions=True)
                own_error: BaseException | None = None
                if last:
                    own_result = results.pop()
                    if isinstance(own_result, BaseException):
                        own_error = own_result
                for (one, message), result in zip(wave, results, strict=True):
                    if isinstance(result, BaseException):
                        if not isinstance(result, Exception):
                            raise result
                        log.error("notifications.batch.message_failed", job_id=one.id,
                                  message_id=str(message), exc_info=result)  # fmt: skip
                        continue  # its lease expires: queued again by the engine's stall rule
                    if result is not None:
                        sent.append((one, result))
                if own_error is not None:
                    raise own_error
        except BaseException:
            if waiting:
                with contextlib.suppress(Exception):
                    await asyncio.shield(release(runtime.db.primary, waiting))
            raise
        finally:
            keeper.cancel()
            # Every "sent" submitted is awaited before its job is acked (and even when the
            # batch failed: a message the relay accepted is recorded whenever possible).
            for one, future in sent:
                try:
                    if await future:
                        EVENTS.labels("sent").inc()
                    done.append(one)  # sent now, or finished by another attempt
                except Exception:
                    log.exception("notifications.batch.sent_not_recorded", job_id=one.id)
            if done:
                await ack(runtime.db.primary, done)

    async def _send_claimed(
        self,
        runtime: Runtime,
        one: Claimed,
        message: UUID,
        decision: Prepared | Settle | None,
        done: list[Claimed],
        *,
        meet: tuple[Meeting[UUID, bool], Meeting[Outcome, bool]],
        member: int,
    ) -> asyncio.Future[bool] | None:
        """One claimed job's message, as a member of its wave (``meet``: where its mark and
        its ``sent`` join the others'): the future of its ``sent`` record, or None when it
        was finished here (its job then completed, or queued for the batch's ack)."""
        marks, sents = meet
        try:
            if decision is None:  # already final (a duplicate job)
                done.append(one)
                return None
            if isinstance(decision, Settle):
                async with runtime.db.session() as session:
                    await self.settle(session, message, decision)
                    await self._complete(session, one)
                return None
            verdict = await self._transmit_in(runtime, decision, meet, member)
            marks.leave(member)
            if verdict.kind == "sent":
                return sents.submit(
                    member, (message, verdict.code, verdict.detail[:1000], decision.subject)
                )
        finally:
            marks.leave(member)
            sents.leave(member)
        async with runtime.db.session() as session:
            await self.record(session, runtime, message, verdict,
                              retry_key=f"notify:{message}:after:{one.id}",
                              subject=decision.subject)  # fmt: skip
            await self._complete(session, one)
        return None

    async def _transmit_in(
        self,
        runtime: Runtime,
        prepared: Prepared,
        meet: tuple[Meeting[UUID, bool], Meeting[Outcome, bool]],
        member: int,
    ) -> Verdict:
        """``transmit`` as a member of a wave: it joins the wave's meetings once it has a
        connection, and its mark goes with the wave's."""
        marks, sents = meet

        def connected() -> None:
            marks.join(member)
            sents.join(member)

        async def mark() -> bool:
            return await marks.submit(member, prepared.id)

        return await self.transmit(runtime, prepared, mark=mark, connected=connected)

    async def _complete(self, session: AsyncSession, one: Claimed) -> None:
        if not await complete_in(session, one):
            raise RuntimeError(f"job {one.id}: its lease was lost; its outcome is rolled back")

    async def _send_own(
        self,
        ctx: JobContext,
        message: UUID,
        prepared: Prepared | Settle | None,
        *,
        meet: tuple[Meeting[UUID, bool], Meeting[Outcome, bool]] | None = None,
        member: int = 0,
    ) -> None:
        """The job's own message, as a job of one (ADR 0026) — in the batch's last wave
        when it has one (``meet``): a rare outcome commits with the job's completion;
        ``sent`` is recorded before the job returns, and the job acked in the engine's
        batch."""
        try:
            await self._own(ctx, message, prepared, meet, member)
        finally:
            if meet is not None:
                meet[0].leave(member)
                meet[1].leave(member)

    async def _own(
        self,
        ctx: JobContext,
        message: UUID,
        prepared: Prepared | Settle | None,
        meet: tuple[Meeting[UUID, bool], Meeting[Outcome, bool]] | None,
        member: int,
    ) -> None:
        runtime = ctx.runtime
        if prepared is None:
            return
        if isinstance(prepared, Settle):
            await self.settle(ctx.session, message, prepared)
            return
        if meet is None:
            verdict = await self.transmit(runtime, prepared)
            if verdict.kind == "sent" and await self.record_sent(
                runtime, message, verdict, subject=prepared.subject
            ):
                return
        else:
            verdict = await self._transmit_in(runtime, prepared, meet, member)
            meet[0].leave(member)
            if verdict.kind == "sent":
                outcome = (message, verdict.code, verdict.detail[:1000], prepared.subject)
                if await meet[1].submit(member, outcome):
                    EVENTS.labels("sent").inc()
                    return
        # Any other outcome commits with the job's completion. If that commit is lost (worker
        # killed, lease lost), the row stays "sending" and the next attempt records
        # "unconfirmed": never a second copy.
        status = await self.record(
            ctx.session, runtime, message, verdict,
            retry_key=f"notify:{message}:after:{ctx.id}", subject=prepared.subject,
        )  # fmt: skip
        if status == "queued":
            ctx.log.info("notifications.email.deferred", message_id=str(message),
                         stage=verdict.stage, code=verdict.code)  # fmt: skip

    async def _keep_leases(self, runtime: Runtime, waiting: list[Claimed]) -> None:
        """Renew the claimed jobs' leases while the batch runs (the worker's heartbeat
        renews only the job it started)."""
        lease = runtime.settings.JOBS_LEASE.total_seconds()
        engine = runtime.db.primary
        claimed = list(waiting)
        while True:
            await asyncio.sleep(max(0.05, lease / 4))
            with contextlib.suppress(Exception):
                await renew(engine, claimed, lease)
