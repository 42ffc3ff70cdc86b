"""kit.jobs.batch on real PostgreSQL: a running handler claiming more jobs of its kind,
and finishing them (ack, complete in a transaction, release, lease renewal)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from surge.kit.jobs import JobContext, enqueue, enqueue_now
from surge.kit.jobs.batch import ack, claim_more, complete_in, release, renew
from surge.kit.jobs.queue import pause_queue, resume_queue
from surge.kit.runtime import Runtime
from tests.kit import jobs_handlers


@pytest.fixture
async def jobs_db(runtime: Runtime) -> Runtime:
    assert jobs_handlers  # registers the test jobs
    async with runtime.db.session() as session:
        await session.execute(text("DELETE FROM jobs WHERE name LIKE 'test.%'"))
    return runtime


def context(runtime: Runtime, name: str = "test.noop", queue: str = "t_noop") -> JobContext:
    """The context of a running job of ``name`` (the one that claims the others)."""
    return JobContext(
        id=0, name=name, queue=queue, payload={}, attempt=1, token=0, stalls=0,
        runtime=runtime, session_factory=async_sessionmaker(runtime.db.primary),
    )  # fmt: skip


async def jobs(runtime: Runtime, name: str = "test.noop") -> dict[int, dict[str, Any]]:
    async with runtime.db.session() as session:
        rows = await session.execute(
            text("SELECT id, state, attempts, lease_token, lease_expires_at FROM jobs "
                 "WHERE name = :name ORDER BY id"),
            {"name": name},
        )  # fmt: skip
        return {row.id: dict(row._mapping) for row in rows}


async def enqueue_some(runtime: Runtime, count: int, name: str = "test.noop") -> list[int]:
    ids = [await enqueue_now(runtime.db.primary, name, {"n": i}) for i in range(count)]
    return [int(id_) for id_ in ids if id_ is not None]


class TestClaimMore:
    async def test_claims_ready_jobs_of_the_same_name_with_leases_and_tokens(
        self, jobs_db: Runtime
    ) -> None:
        ids = await enqueue_some(jobs_db, 5)
        await enqueue_now(jobs_db.db.primary, "test.record", {"note": "other name"})

        claimed = await claim_more(context(jobs_db), 3)

        assert [c.id for c in claimed] == ids[:3]
        assert [c.payload for c in claimed] == [{"n": 0}, {"n": 1}, {"n": 2}]
        state = await jobs(jobs_db)
        for c in claimed:
            assert state[c.id]["state"] == "active"
            assert state[c.id]["lease_token"] == c.token
            assert state[c.id]["attempts"] == c.attempt == 1
            assert state[c.id]["lease_expires_at"] is not None
        assert [state[i]["state"] for i in ids[3:]] == ["queued", "queued"]
        assert next(iter((await jobs(jobs_db, "test.record")).values()))["state"] == "queued"

    async def test_two_claims_never_take_the_same_job(self, jobs_db: Runtime) -> None:
        await enqueue_some(jobs_db, 6)
        first = await claim_more(context(jobs_db), 4)
        second = await claim_more(context(jobs_db), 4)
        assert len(first) == 4
        assert len(second) == 2
        assert not {c.id for c in first} & {c.id for c in second}

    async def test_nothing_from_a_paused_or_rate_limited_queue_nor_a_keyed_job(
        self, jobs_db: Runtime
    ) -> None:
        async with jobs_db.db.session() as session:
            await enqueue(session, "test.noop", {"keyed": True}, lock_key="account:1")
        assert await claim_more(context(jobs_db), 5) == []  # a lock key: the worker's rule

        await enqueue_some(jobs_db, 2)
        async with jobs_db.db.session() as session:
            await pause_queue(session, "t_noop")
        try:
            assert await claim_more(context(jobs_db), 5) == []
        finally:
            async with jobs_db.db.session() as session:
                await resume_queue(session, "t_noop")

        limited = context(jobs_db)
        limited.runtime.settings.JOBS_RATE_LIMITS["t_noop"] = "10/s"
        try:
            assert await claim_more(limited, 5) == []
        finally:
            del limited.runtime.settings.JOBS_RATE_LIMITS["t_noop"]
        assert len(await claim_more(context(jobs_db), 5)) == 2


class TestFinishing:
    async def test_ack_is_fenced_by_the_token(self, jobs_db: Runtime) -> None:
        await enqueue_some(jobs_db, 3)
        claimed = await claim_more(context(jobs_db), 3)
        # The second job's lease was lost: another attempt owns it now.
        async with jobs_db.db.session() as session:
            await session.execute(
                text("UPDATE jobs SET lease_token = lease_token + 1000 WHERE id = :id"),
                {"id": claimed[1].id},
            )
        done = await ack(jobs_db.db.primary, claimed)
        assert done == {claimed[0].id, claimed[2].id}
        state = await jobs(jobs_db)
        assert [state[c.id]["state"] for c in claimed] == ["succeeded", "active", "succeeded"]

    async def test_complete_in_commits_or_rolls_back_with_the_callers_writes(
        self, jobs_db: Runtime
    ) -> None:
        await enqueue_some(jobs_db, 2)
        kept, lost = await claim_more(context(jobs_db), 2)
        async with jobs_db.db.session() as session:
            assert await complete_in(session, kept)
            await session.rollback()  # the caller's unit of work failed: nothing completed
        assert (await jobs(jobs_db))[kept.id]["state"] == "active"
        async with jobs_db.db.session() as session:
            assert await complete_in(session, kept)
        async with jobs_db.db.session() as session:
            await session.execute(
                text("UPDATE jobs SET lease_token = lease_token + 1000 WHERE id = :id"),
                {"id": lost.id},
            )
        async with jobs_db.db.session() as session:
            assert not await complete_in(session, lost)
        state = await jobs(jobs_db)
        assert state[kept.id]["state"] == "succeeded"
        assert state[lost.id]["state"] == "active"

    async def test_release_puts_jobs_back_without_counting_the_attempt(
        self, jobs_db: Runtime
    ) -> None:
        await enqueue_some(jobs_db, 2)
        claimed = await claim_more(context(jobs_db), 2)
        assert await release(jobs_db.db.primary, claimed) == {c.id for c in claimed}
        state = await jobs(jobs_db)
        for c in claimed:
            assert state[c.id]["state"] == "queued"
            assert state[c.id]["attempts"] == 0
            assert state[c.id]["lease_token"] is None
        again = await claim_more(context(jobs_db), 2)
        assert {c.id for c in again} == {c.id for c in claimed}

    async def test_renew_extends_only_the_leases_still_owned(self, jobs_db: Runtime) -> None:
        await enqueue_some(jobs_db, 2)
        claimed = await claim_more(context(jobs_db), 2)
        before = await jobs(jobs_db)
        await ack(jobs_db.db.primary, claimed[:1])
        assert await renew(jobs_db.db.primary, claimed, 600) == {claimed[1].id}
        after = await jobs(jobs_db)
        assert after[claimed[1].id]["lease_expires_at"] > before[claimed[1].id]["lease_expires_at"]
