"""kit.jobs on real PostgreSQL: transactional enqueue, dedup, retries, fencing, periodic.

In-process ``Worker``s run here; the crash/freeze/fleet scenarios, which need real worker
processes, are in ``test_jobs_processes.py``."""

from __future__ import annotations

import asyncio
import itertools
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from surge.config import Settings
from surge.kit.jobs import (
    JobStateConflict,
    UnknownJob,
    _driver,
    enqueue,
    enqueue_batches,
    enqueue_many,
    enqueue_now,
    get_job,
    retry_job,
)
from surge.kit.jobs._sql import ACK, FETCH
from surge.kit.jobs.config import RateLimit
from surge.kit.jobs.queue import pause_queue, resume_queue
from surge.kit.jobs.registry import get_spec
from surge.kit.jobs.worker import Worker, WorkerConfig
from surge.kit.runtime import Runtime
from tests.fixtures.waiting import eventually
from tests.fixtures.workers import running_worker as shared_worker
from tests.kit import jobs_handlers
from tests.kit.jobs_handlers import EFFECTS_DDL

FAST: dict[str, Any] = {
    "lease": timedelta(seconds=1),
    "stalled_check": timedelta(milliseconds=300),
    "poll_interval": timedelta(milliseconds=100),
    "shutdown_grace": timedelta(seconds=2),
}


@pytest.fixture
async def jobs_db(runtime: Runtime) -> Runtime:
    assert jobs_handlers  # registers the test jobs
    async with runtime.db.session() as session:
        await session.execute(text(EFFECTS_DDL))
        await session.execute(text("DELETE FROM jobs WHERE name LIKE 'test.%'"))
        await session.execute(text("DELETE FROM job_test_effects"))
        await session.execute(text("DELETE FROM job_dispatches WHERE queue LIKE 't\\_%'"))
    return runtime


def running_worker(
    runtime: Runtime, queues: list[str], **overrides: Any
) -> AbstractAsyncContextManager[Worker]:
    """The shared in-process worker with this module's timings (WorkerConfig's concurrency
    and backoff, short lease and stall checks)."""
    timings: dict[str, Any] = {"concurrency": 8, "backoff": timedelta(seconds=5), **FAST}
    return shared_worker(runtime, queues, stop_timeout=10, **{**timings, **overrides})


async def state_of(runtime: Runtime, job_id: int) -> str:
    async with runtime.db.session() as session:
        info = await get_job(session, job_id)
    assert info is not None
    return info.state


class TestTransactionalEnqueue:
    async def test_rollback_of_the_enqueuing_transaction_leaves_no_job(
        self, jobs_db: Runtime
    ) -> None:
        class Boom(Exception):
            pass

        enqueued: list[int] = []

        async def failing_unit_of_work() -> None:
            async with jobs_db.db.session() as session:
                job_id = await enqueue(session, "test.record", {"note": "never"})
                assert job_id is not None
                enqueued.append(job_id)
                raise Boom

        with pytest.raises(Boom):
            await failing_unit_of_work()
        assert len(enqueued) == 1
        job_id = enqueued[0]
        async with jobs_db.db.session() as session:
            assert await get_job(session, job_id) is None
            count = await session.scalar(text("SELECT count(*) FROM jobs WHERE name LIKE 'test.%'"))
        assert count == 0

    async def test_enqueue_rides_on_the_callers_connection(self, jobs_db: Runtime) -> None:
        async with jobs_db.db.session() as session:
            job_id = await enqueue(session, "test.record", {"note": "x"})
            # Visible inside the transaction, invisible to any other connection until commit.
            assert await get_job(session, job_id or 0) is not None
            async with jobs_db.db.session() as other:
                assert await get_job(other, job_id or 0) is None
        async with jobs_db.db.session() as session:
            assert await get_job(session, job_id or 0) is not None

    async def test_enqueues_after_the_first_statement_roll_back_with_the_transaction(
        self, jobs_db: Runtime
    ) -> None:
        """Once the transaction has begun, enqueue sends its prepared INSERT on the driver
        connection under the session (ADR 0025): it must still be inside that transaction."""

        class Boom(Exception):
            pass

        ids: list[int | None] = []

        async def failing_unit_of_work() -> None:
            async with jobs_db.db.session() as session:
                await session.execute(text("SELECT 1"))
                ids.append(await enqueue(session, "test.record", {"note": "a"}))
                ids.append(await enqueue(session, "test.record", {"note": "b"}, dedup_key="rb"))
                ids.append(await enqueue(session, "test.record", {"note": "c"}, dedup_key="rb"))
                raise Boom

        with pytest.raises(Boom):
            await failing_unit_of_work()
        assert ids[0] is not None
        assert ids[1] is not None
        assert ids[2] is None  # the dedup key held inside the transaction
        async with jobs_db.db.session() as session:
            count = await session.scalar(text("SELECT count(*) FROM jobs WHERE name LIKE 'test.%'"))
        assert count == 0

    async def test_enqueue_as_the_first_statement_brings_its_begin_along(
        self, jobs_db: Runtime
    ) -> None:
        """A transaction's first statement being an enqueue: the BEGIN rides with the INSERT
        (one query on the wire once the statement is prepared on the connection, ADR 0030),
        a dedup hit still returns ``None``, and the job commits or rolls back with the
        transaction."""
        sent: list[int] = []
        ids: list[int | None] = []
        for note in ("1", "2", "3"):
            async with jobs_db.db.session() as session:
                connection = await session.connection()
                driver = (await connection.get_raw_connection()).driver_connection
                assert driver is not None
                before = driver._protocol.queries_count
                ids.append(await enqueue(session, "test.record", {"note": note}, dedup_key="f1"))
                sent.append(driver._protocol.queries_count - before)
                assert driver.is_in_transaction()
        assert ids[0] is not None
        assert ids[1:] == [None, None]
        assert sent[-1] == 1, sent  # the plain path sent two: BEGIN, then the INSERT

        class Boom(Exception):
            pass

        async def rolled_back() -> None:
            async with jobs_db.db.session() as session:
                await enqueue(session, "test.record", {"note": "never"}, dedup_key="f2")
                raise Boom

        with pytest.raises(Boom):
            await rolled_back()
        async with jobs_db.db.session() as session:
            keys = await session.scalars(
                text("SELECT dedup_key FROM jobs WHERE name = 'test.record' ORDER BY id")
            )
            assert list(keys) == ["f1"]

    async def test_a_failing_enqueue_raises_sqlalchemys_error_and_commits_nothing(
        self, jobs_db: Runtime
    ) -> None:
        """``now() + delay`` past PostgreSQL's last timestamp fails on the server."""

        async def unit_of_work() -> None:
            async with jobs_db.db.session() as session:
                await session.execute(text("SELECT 1"))
                await enqueue(session, "test.record", {"note": "kept?"})
                await enqueue(session, "test.record", delay=timedelta(days=999_999_999))

        with pytest.raises(DBAPIError):
            await unit_of_work()
        async with jobs_db.db.session() as session:
            count = await session.scalar(text("SELECT count(*) FROM jobs WHERE name LIKE 'test.%'"))
        assert count == 0

    async def test_a_session_reused_after_commit_enqueues_in_its_new_transaction(
        self, jobs_db: Runtime
    ) -> None:
        async with jobs_db.db._sessions() as session:
            await session.execute(text("SELECT 1"))
            first = await enqueue(session, "test.record", {"note": "1"})
            await session.commit()
            await session.execute(text("SELECT 1"))
            second = await enqueue(session, "test.record", {"note": "2"})
            await session.rollback()
        async with jobs_db.db.session() as session:
            assert await get_job(session, first or 0) is not None
            assert await get_job(session, second or 0) is None

    async def test_unknown_job_name_is_refused(self, jobs_db: Runtime) -> None:
        async with jobs_db.db.session() as session:
            with pytest.raises(UnknownJob):
                await enqueue(session, "test.nope")


class TestFetch:
    async def test_takes_the_highest_priorities_across_queues_and_skips_a_paused_one(
        self, jobs_db: Runtime
    ) -> None:
        """One ordered scan per queue (ADR 0025), merged by priority; a paused queue gives
        nothing, however urgent its jobs."""
        async with jobs_db.db.session() as session:
            low = await enqueue(session, "test.record", {"n": 1}, priority=0)
            high = await enqueue(session, "test.noop", {"n": 2}, priority=5)
            mid = await enqueue(session, "test.record", {"n": 3}, priority=3)
            urgent = await enqueue(session, "test.fail", {"n": 4}, priority=9)
            await pause_queue(session, "t_fail")
        try:
            args = (["t_record", "t_noop", "t_fail"], 2, "test-worker", 30.0)
            first = await _driver.pooled(jobs_db.db.primary, FETCH, args, rows=True)
            second = await _driver.pooled(jobs_db.db.primary, FETCH, args, rows=True)
        finally:
            async with jobs_db.db.session() as session:
                await resume_queue(session, "t_fail")
        assert {row[0] for row in first} == {high, mid}
        assert [row[0] for row in second] == [low]
        assert urgent is not None
        assert await state_of(jobs_db, urgent) == "queued"


class TestEnqueueNow:
    async def test_commits_at_once_with_the_registered_options(self, jobs_db: Runtime) -> None:
        job_id = await enqueue_now(jobs_db.db.primary, "test.record", {"note": "now"})
        assert job_id is not None
        async with jobs_db.db.session() as session:
            info = await get_job(session, job_id)
            row = (
                await session.execute(
                    text("SELECT queue, payload, max_attempts FROM jobs WHERE id = :id"),
                    {"id": job_id},
                )
            ).one()
        assert info is not None
        assert info.state == "queued"
        assert row.queue == "t_record"
        assert row.payload == {"note": "now"}
        spec = get_spec("test.record")
        assert spec is not None
        assert row.max_attempts == spec.max_attempts

    async def test_dedup_key_and_unknown_names(self, jobs_db: Runtime) -> None:
        first = await enqueue_now(jobs_db.db.primary, "test.record", dedup_key="now-1")
        again = await enqueue_now(jobs_db.db.primary, "test.record", dedup_key="now-1")
        assert first is not None
        assert again is None
        with pytest.raises(UnknownJob):
            await enqueue_now(jobs_db.db.primary, "test.nope")

    async def test_a_worker_runs_it(self, jobs_db: Runtime) -> None:
        job_id = await enqueue_now(
            jobs_db.db.primary, "test.record", {"note": "ran"}, delay=timedelta(0)
        )
        assert job_id is not None
        async with running_worker(jobs_db, ["t_record"]):
            await eventually(lambda: _is(jobs_db, job_id, "succeeded"))


class TestRun:
    async def test_job_runs_once_and_its_writes_commit_with_it(self, jobs_db: Runtime) -> None:
        async with jobs_db.db.session() as session:
            job_id = await enqueue(session, "test.record", {"note": "hello"})
        assert job_id is not None
        async with running_worker(jobs_db, ["t_record"]):
            await eventually(lambda: _is(jobs_db, job_id, "succeeded"))
        async with jobs_db.db.session() as session:
            notes = (await session.execute(
                text("SELECT note FROM job_test_effects WHERE job_id = :id"), {"id": job_id}
            )).scalars().all()  # fmt: skip
        assert notes == ["hello"]

    async def test_bulk_and_batches(self, jobs_db: Runtime) -> None:
        async with jobs_db.db.session() as session:
            ids = await enqueue_many(session, "test.noop", [{"i": i} for i in range(500)])
            batch_ids = await enqueue_batches(
                session, "test.record", range(120), batch_size=50, dedup_prefix="ev1"
            )
            again = await enqueue_batches(
                session, "test.record", range(120), batch_size=50, dedup_prefix="ev1"
            )
        assert len(ids) == 500
        assert len(batch_ids) == 3  # 50 + 50 + 20
        assert again == []  # same split, same dedup keys: nothing new
        async with jobs_db.db.session() as session:
            sizes = (await session.execute(text(
                "SELECT jsonb_array_length(payload->'items') FROM jobs "
                "WHERE id = ANY(:ids) ORDER BY id"), {"ids": batch_ids})).scalars().all()  # fmt: skip
        assert sizes == [50, 50, 20]
        async with running_worker(jobs_db, ["t_noop"], concurrency=16):
            await eventually(lambda: _count(jobs_db, "test.noop", "succeeded", 500))


class TestShutdown:
    async def test_the_ack_in_flight_when_the_worker_stops_is_sent(
        self, jobs_db: Runtime, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job that never touched the database is acked in a batch a moment after it
        returns. Here that batch's statement is on its way (held back until the test lets
        it go) when the worker is told to stop: the shutdown must wait for it, not find no
        ack waiting and cancel it — the job, done, would stay ``active`` and run again once
        its lease expired."""
        in_flight, may_send = asyncio.Event(), asyncio.Event()
        pooled = _driver.pooled

        async def held_back(engine: Any, statement: str, args: Any, *, rows: bool = False) -> Any:
            if statement == ACK:
                in_flight.set()
                await may_send.wait()
            return await pooled(engine, statement, args, rows=rows)

        monkeypatch.setattr(_driver, "pooled", held_back)
        job_id = await enqueue_now(jobs_db.db.primary, "test.noop", {})
        assert job_id is not None
        worker = Worker(jobs_db, WorkerConfig(queues=["t_noop"], **FAST))
        stop = asyncio.Event()
        run = asyncio.create_task(worker.run(stop))
        try:
            await asyncio.wait_for(in_flight.wait(), 10)
            stop.set()
            await eventually(lambda: worker.stopping, message="the shutdown did not begin")
            may_send.set()
            await asyncio.wait_for(run, 10)
        finally:
            stop.set()
            may_send.set()
            await asyncio.wait_for(run, 10)
        assert await state_of(jobs_db, job_id) == "succeeded"


class TestStallAccounting:
    async def test_expired_lease_is_requeued_counted_and_then_failed(
        self, jobs_db: Runtime
    ) -> None:
        """The reaper alone, deterministically: a lease in the past is one stall (re-queued,
        counter +1); past max_stalled the job is failed, not looped."""
        from prometheus_client import REGISTRY

        def stalled_total() -> float:
            value = REGISTRY.get_sample_value("surge_jobs_stalled_total", {"queue": "t_record"})
            return value or 0.0

        async with jobs_db.db.session() as session:
            job_id = await enqueue(session, "test.record")
        assert job_id is not None
        worker = Worker(jobs_db, WorkerConfig(queues=["t_none"], max_stalled=1, **FAST))
        before = stalled_total()
        for expected_state in ("queued", "failed"):
            async with jobs_db.db.session() as session:
                await session.execute(
                    text(
                        "UPDATE jobs SET state = 'active', lease_token = 1, attempts = attempts + 1, "
                        "lease_expires_at = now() - interval '1 second' WHERE id = :id"
                    ),
                    {"id": job_id},
                )
            assert await worker.recover_stalled() >= 1
            assert await state_of(jobs_db, job_id) == expected_state
        async with jobs_db.db.session() as session:
            info = await get_job(session, job_id)
        assert info is not None
        assert info.stalls == 2
        assert "stalled more than 1 times" in (info.last_error or "")
        assert stalled_total() - before == 2


class TestFencing:
    async def test_a_handler_cannot_commit_its_session_itself(self, jobs_db: Runtime) -> None:
        async with jobs_db.db.session() as session:
            job_id = await enqueue(session, "test.commits")
        assert job_id is not None
        async with running_worker(jobs_db, ["t_commits"]):
            await eventually(lambda: _is(jobs_db, job_id, "failed"))
        async with jobs_db.db.session() as session:
            info = await get_job(session, job_id)
            effects = await session.scalar(text("SELECT count(*) FROM job_test_effects"))
        assert info is not None
        assert "must not commit ctx.session" in (info.last_error or "")
        assert effects == 0

    async def test_a_handler_may_use_savepoints(self, jobs_db: Runtime) -> None:
        async with jobs_db.db.session() as session:
            job_id = await enqueue(session, "test.savepoint")
        assert job_id is not None
        async with running_worker(jobs_db, ["t_savepoint"]):
            await eventually(lambda: _is(jobs_db, job_id, "succeeded"))
        async with jobs_db.db.session() as session:
            notes = (await session.execute(
                text("SELECT note FROM job_test_effects WHERE job_id = :j ORDER BY note"),
                {"j": job_id})).scalars().all()  # fmt: skip
        assert notes == ["after", "before"]


class TestDedupAndLock:
    async def test_dedup_key_holds_under_concurrent_enqueues(self, jobs_db: Runtime) -> None:
        async def one() -> int | None:
            async with jobs_db.db.session() as session:
                return await enqueue(session, "test.record", {"note": "d"}, dedup_key="k1")

        results = await asyncio.gather(*(one() for _ in range(20)))
        created = [r for r in results if r is not None]
        assert len(created) == 1
        # Once it ran, the key is free again.
        async with running_worker(jobs_db, ["t_record"]):
            await eventually(lambda: _is(jobs_db, created[0], "succeeded"))
        assert await one() is not None

    async def test_lock_key_serialises_jobs_across_workers(self, jobs_db: Runtime) -> None:
        async with jobs_db.db.session() as session:
            await enqueue_many(
                session, "test.locked", [{"key": f"acct{i % 2}"} for i in range(12)],
                lock_keys=[f"acct{i % 2}" for i in range(12)],
            )  # fmt: skip
        async with (
            running_worker(jobs_db, ["t_locked"], concurrency=8),
            running_worker(jobs_db, ["t_locked"], concurrency=8),
        ):
            await eventually(lambda: _count(jobs_db, "test.locked", "succeeded", 12), timeout=20)
        async with jobs_db.db.session() as session:
            rows = (await session.execute(text(
                "SELECT note, started_at, at FROM job_test_effects ORDER BY note, started_at"
            ))).all()  # fmt: skip
        assert len(rows) == 12
        for (key_a, _, end_a), (key_b, start_b, _) in itertools.pairwise(rows):
            if key_a == key_b:
                assert start_b >= end_a, f"two {key_a} jobs overlapped"


class TestRetries:
    async def test_retries_follow_the_backoff_then_fail_with_the_last_error(
        self, jobs_db: Runtime
    ) -> None:
        from prometheus_client import REGISTRY

        async with jobs_db.db.session() as session:
            job_id = await enqueue(session, "test.fail")
        assert job_id is not None
        async with running_worker(jobs_db, ["t_fail"], poll_interval=timedelta(milliseconds=20)):
            deadline = asyncio.get_running_loop().time() + 15
            while asyncio.get_running_loop().time() < deadline:
                async with jobs_db.db.session() as session:
                    info = await get_job(session, job_id)
                assert info is not None
                if info.state == "failed":
                    break
                await asyncio.sleep(0.01)
        assert info is not None
        assert info.state == "failed"
        assert info.attempts == 3
        assert (
            REGISTRY.get_sample_value("surge_jobs_retried_total", {"queue": "t_fail"}) or 0
        ) >= 2
        assert info.last_error is not None
        assert "boom on attempt 3" in info.last_error
        # backoff 200 ms doubled, equal jitter: gap 1 in [0.1, 0.2], gap 2 in [0.2, 0.4] s,
        # plus the worker's 20 ms poll and the loaded box's scheduling. Timed where each
        # attempt started (in the handler), not when this loop happened to see it: a late
        # look at one attempt made the next gap look shorter than the backoff.
        starts = jobs_handlers.FAIL_STARTS[job_id]
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert len(gaps) == 2
        assert 0.1 <= gaps[0] <= 0.2 + 0.5, gaps
        assert 0.2 <= gaps[1] <= 0.4 + 0.5, gaps

    async def test_snooze_waits_without_spending_attempts(self, jobs_db: Runtime) -> None:
        """Five snoozes of a job allowed two attempts: it still runs to success, every start
        saw attempt 1, and what a snoozed start wrote through ``ctx.session`` is gone."""
        from prometheus_client import REGISTRY

        async with jobs_db.db.session() as session:
            job_id = await enqueue(session, "test.snooze", {"snoozes": 5})
        assert job_id is not None
        before = REGISTRY.get_sample_value("surge_jobs_snoozed_total", {"queue": "t_snooze"})
        async with running_worker(jobs_db, ["t_snooze"]):
            await eventually(lambda: _is(jobs_db, job_id, "succeeded"))
        async with jobs_db.db.session() as session:
            notes = list(
                await session.scalars(
                    text("SELECT note FROM job_test_effects WHERE job_id = :j ORDER BY id"),
                    {"j": job_id},
                )
            )
            info = await get_job(session, job_id)
        assert notes == ["start"] * 6 + ["attempt 1", "done"], notes
        assert info is not None
        assert info.attempts == 1
        after = REGISTRY.get_sample_value("surge_jobs_snoozed_total", {"queue": "t_snooze"})
        assert (after or 0) - (before or 0) == 5

    async def test_a_snoozed_start_gives_its_rate_budget_back(self, jobs_db: Runtime) -> None:
        """ADR 0060: a queue limited to 2 starts a minute runs a job that snoozes three times
        and another job at once: only the starts that did not snooze spend the budget.
        Before, the snoozes spent it and the second job waited for the next minute."""
        async with jobs_db.db.session() as session:
            snoozing = await enqueue(session, "test.snooze", {"snoozes": 3})
            plain = await enqueue(session, "test.snooze", {"snoozes": 0})
        assert snoozing is not None
        assert plain is not None
        limits = {"t_snooze": RateLimit(2, timedelta(minutes=1))}
        async with running_worker(jobs_db, ["t_snooze"], rate_limits=limits):
            await eventually(lambda: _is(jobs_db, snoozing, "succeeded"), timeout=20)
            await eventually(lambda: _is(jobs_db, plain, "succeeded"), timeout=20)
        async with jobs_db.db.session() as session:
            spent = await session.scalar(
                text("SELECT count(*) FROM job_dispatches WHERE queue = 't_snooze'")
            )
        assert spent == 2  # the two starts that ran to the end

    async def test_retry_from_failed(self, jobs_db: Runtime) -> None:
        async with jobs_db.db.session() as session:
            job_id = await enqueue(session, "test.fail", max_attempts=1)
        assert job_id is not None
        async with running_worker(jobs_db, ["t_fail"]):
            await eventually(lambda: _is(jobs_db, job_id, "failed"))
            async with jobs_db.db.session() as session:
                info = await retry_job(session, job_id)
            assert info.state == "queued"
            assert info.attempts == 0
            await eventually(lambda: _is(jobs_db, job_id, "failed"))
        async with jobs_db.db.session() as session:
            with pytest.raises(JobStateConflict):
                await retry_job(session, (await enqueue(session, "test.record")) or 0)


async def _is(runtime: Runtime, job_id: int, state: str) -> bool:
    return await state_of(runtime, job_id) == state


async def _count(runtime: Runtime, name: str, state: str, expected: int) -> bool:
    async with runtime.db.session() as session:
        n = await session.scalar(
            text("SELECT count(*) FROM jobs WHERE name = :n AND state = :s"),
            {"n": name, "s": state},
        )
    return bool(n == expected)


__all__ = ["Settings"]


class TestAdminApi:
    async def test_stats_failures_and_retry(self, jobs_db: Runtime) -> None:
        from fastapi import FastAPI
        from httpx import ASGITransport, AsyncClient

        from surge.kit.jobs.admin import admin_router
        from surge.kit.web.problem import install_problem_handlers

        app = FastAPI()
        app.state.runtime = jobs_db
        install_problem_handlers(app)
        app.include_router(admin_router())
        async with jobs_db.db.session() as session:
            failed_id = await enqueue(session, "test.fail", max_attempts=1)
            await enqueue_many(session, "test.record", [{}] * 3)
        assert failed_id is not None
        async with running_worker(jobs_db, ["t_fail"]):
            await eventually(lambda: _is(jobs_db, failed_id, "failed"))
        transport = ASGITransport(app=app)
        async with AsyncClient(transport=transport, base_url="http://t") as web:
            overview = (await web.get("/api/admin/jobs")).json()
            queues = {q["queue"]: q for q in overview["queues"]}
            assert queues["t_record"]["ready"] == 3
            assert queues["t_record"]["oldest_age_seconds"] >= 0
            assert queues["t_fail"]["failed_retained"] >= 1
            assert overview["recent_failures"][0]["id"] == failed_id
            assert "boom" in overview["recent_failures"][0]["last_error"]
            detail = (await web.get(f"/api/admin/jobs/{failed_id}")).json()
            assert detail["state"] == "failed"
            retried = await web.post(f"/api/admin/jobs/{failed_id}/retry")
            assert retried.status_code == 200
            assert retried.json()["state"] == "queued"
            again = await web.post(f"/api/admin/jobs/{failed_id}/retry")
            assert again.status_code == 409
            assert again.headers["content-type"].startswith("application/problem+json")
            assert (await web.get("/api/admin/jobs/999999999")).status_code == 404
            for beyond in (2**63, -(2**63) - 1, 0):  # past BIGINT, or no job id at all
                for method, path in (
                    ("GET", f"/api/admin/jobs/{beyond}"),
                    ("POST", f"/api/admin/jobs/{beyond}/retry"),
                    ("POST", f"/api/admin/jobs/{beyond}/cancel"),
                ):
                    refused = await web.request(method, path)
                    assert refused.status_code == 422, (path, refused.text)
            waiting = (await web.get("/api/admin/jobs")).json()["queues"]
            assert {q["queue"]: q for q in waiting}["t_record"]["ready"] == 3
            async with jobs_db.db.session() as session:
                queued_id = await enqueue(session, "test.record", delay=timedelta(hours=1))
            cancelled = await web.post(f"/api/admin/jobs/{queued_id}/cancel")
            assert cancelled.json()["state"] == "cancelled"
            assert (await web.post(f"/api/admin/jobs/{queued_id}/cancel")).status_code == 409

    async def test_the_app_guards_the_jobs_admin_api(self, client: object) -> None:
        from httpx import AsyncClient

        assert isinstance(client, AsyncClient)
        response = await client.get("/api/admin/jobs")
        assert response.status_code in (401, 403)


class TestPeriodic:
    async def test_cron_slot_is_enqueued_once_by_one_of_many_workers(
        self, jobs_db: Runtime
    ) -> None:
        from surge.kit.jobs import job as register
        from surge.kit.jobs.registry import unregister

        # Yearly: the slot made due below is the only one that can fall inside this test
        # (an every-minute schedule legitimately fires twice across a minute boundary).
        @register("test.cron", queue="t_cron", cron="0 0 1 1 *")
        async def tick(ctx: object) -> None:
            return None

        try:
            async with jobs_db.db.session() as session:
                await session.execute(text("DELETE FROM job_schedules WHERE name = 'test.cron'"))
                await session.execute(
                    text(
                        "INSERT INTO job_schedules (name, next_run_at) "
                        "VALUES ('test.cron', now() - interval '1 second')"
                    )
                )
            async with (
                running_worker(jobs_db, ["t_cron"]),
                running_worker(jobs_db, ["t_cron"]),
                running_worker(jobs_db, ["t_cron"]),
            ):
                await eventually(lambda: _count(jobs_db, "test.cron", "succeeded", 1))
                await asyncio.sleep(1.0)  # three more maintenance rounds each
            async with jobs_db.db.session() as session:
                count = await session.scalar(
                    text("SELECT count(*) FROM jobs WHERE name = 'test.cron'")
                )
                next_at = await session.scalar(
                    text("SELECT next_run_at > now() FROM job_schedules WHERE name = 'test.cron'")
                )
            assert count == 1
            assert next_at is True
        finally:
            unregister("test.cron")

    def test_cron_expressions(self) -> None:
        from datetime import UTC, datetime

        from surge.kit.jobs.cron import Cron, CronError

        at = datetime(2026, 11, 22, 10, 7, 30, tzinfo=UTC)  # a Sunday
        assert Cron.parse("*/15 * * * *").next_after(at) == at.replace(minute=15, second=0)
        assert Cron.parse("0 6 * * *").next_after(at) == datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
        assert Cron.parse("30 9 * * 1-5").next_after(at) == datetime(
            2026, 11, 23, 9, 30, tzinfo=UTC
        )
        assert Cron.parse("0 0 1 * *").next_after(at) == datetime(2026, 12, 1, tzinfo=UTC)
        assert Cron.parse("@daily").next_after(at) == datetime(2026, 11, 23, tzinfo=UTC)
        with pytest.raises(CronError):
            Cron.parse("61 * * * *")
        with pytest.raises(CronError):
            Cron.parse("* * *")


class TestSchema:
    async def test_the_migration_matches_the_kits_table_definitions(self, runtime: Runtime) -> None:
        """Alembic's autogenerate, run against the migrated database, finds nothing to change
        in the jobs tables: the hand-written migration and ``define_tables`` agree."""
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext
        from sqlalchemy import MetaData

        from surge.kit.jobs.schema import define_tables
        from surge.models.base import NAMING_CONVENTION

        metadata = MetaData(naming_convention=NAMING_CONVENTION)
        ours = set(define_tables(metadata))

        def diff(sync_conn: object) -> list[object]:
            context = MigrationContext.configure(sync_conn)  # type: ignore[arg-type]
            return list(compare_metadata(context, metadata))

        async with runtime.db.primary.connect() as conn:
            changes = await conn.run_sync(diff)

        def about_ours(change: object) -> bool:
            text_ = repr(change)
            if isinstance(change, tuple) and change and change[0] == "remove_table":
                return bool(change[1].name in ours)
            return any(f"'{name}'" in text_ or f"table={name}" in text_ for name in ours)

        assert [c for c in changes if about_ours(c)] == []
