"""kit.jobs with real worker processes: SIGKILL mid-job, a job that kills its worker,
SIGSTOP past the lease (fencing), the rate limit across two processes, graceful shutdown,
the fleet restarting a crashed child. Leases are 1 s and the stall check 0.3 s here."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import IO

import httpx
import pytest
from sqlalchemy import text

from surge.kit.embedded import free_port
from surge.kit.jobs import enqueue, enqueue_many
from surge.kit.jobs.worker import Worker
from surge.kit.runtime import Runtime
from tests.fixtures.waiting import eventually
from tests.fixtures.workers import running_worker
from tests.kit import jobs_handlers
from tests.kit.jobs_handlers import EFFECTS_DDL

ROOT = Path(__file__).resolve().parents[2]
LEASE = 1.0
CHECK = 0.3


@pytest.fixture
async def jobs_db(runtime: Runtime) -> Runtime:
    assert jobs_handlers
    async with runtime.db.session() as session:
        await session.execute(text(EFFECTS_DDL))
        await session.execute(text("DELETE FROM jobs WHERE name LIKE 'test.%'"))
        await session.execute(text("DELETE FROM job_test_effects"))
        await session.execute(text("DELETE FROM job_dispatches WHERE queue LIKE 't\\_%'"))
    return runtime


def worker_env(runtime: Runtime, **extra: str) -> dict[str, str]:
    settings = runtime.settings
    return {
        **os.environ,
        "DATABASE_URL": settings.DATABASE_URL,
        "REDIS_URL": settings.REDIS_URL,
        "SURGE_ENV": "test",
        "SURGE_SECRET_KEY": settings.SECRET_KEY.get_secret_value(),
        "SURGE_LOG_JSON": "true",
        "SURGE_LOG_LEVEL": "INFO",
        "SURGE_DB_POOL_MIN": "1",
        "SURGE_JOBS_MODULES": "tests.kit.jobs_handlers",
        "SURGE_JOBS_LEASE": f"PT{LEASE}S",
        "SURGE_JOBS_STALLED_CHECK": f"PT{CHECK}S",
        "SURGE_JOBS_POLL_INTERVAL": "PT0.1S",
        "SURGE_JOBS_SHUTDOWN_GRACE": "PT5S",
        **extra,
    }


@contextmanager
def worker_process(
    runtime: Runtime, queues: str, log: Path, *, concurrency: int = 4, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "surge.worker", "--queues", queues,
             "--concurrency", str(concurrency)],
            env=worker_env(runtime, **env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            _wait_started(proc, log)
            yield proc
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()


def _wait_started(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Until the worker says it runs: what each test times starts from a worker that is
    there, not from an interpreter starting up on a loaded box (15 s were not enough at a
    load average of 14)."""
    deadline = time.monotonic() + timeout
    while "jobs.worker.started" not in read_log(log):
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}: {read_log(log)[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"worker not started in {timeout}s: {read_log(log)[-2000:]}")
        time.sleep(0.05)


def start_fleet(env: dict[str, str], out: IO[bytes], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "surge.cli", "worker", "--processes", "2",
         "--metrics-port", str(port)],
        env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip


def in_process_worker(runtime: Runtime, queues: list[str]) -> AbstractAsyncContextManager[Worker]:
    """A second worker that starts instantly (no interpreter start-up to wait for)."""
    return running_worker(
        runtime, queues, name=f"in-process:{os.getpid()}", concurrency=8,
        backoff=timedelta(seconds=5), lease=timedelta(seconds=LEASE),
        stalled_check=timedelta(seconds=CHECK), poll_interval=timedelta(milliseconds=100),
        shutdown_grace=timedelta(seconds=5),
    )  # fmt: skip


def read_log(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def worker_name(proc: subprocess.Popen[bytes]) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


async def job_row(runtime: Runtime, job_id: int) -> dict[str, object]:
    async with runtime.db.session() as session:
        row = (
            await session.execute(
                text(
                    "SELECT state, worker, attempts, stalls, lease_token, dispatched_at, "
                    "last_error FROM jobs WHERE id = :id"
                ),
                {"id": job_id},
            )
        ).one()
    return dict(row._mapping)


async def wait_row(
    runtime: Runtime, job_id: int, timeout: float = 15.0, **expected: object
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        row = await job_row(runtime, job_id)
        if all(row[k] == v for k, v in expected.items()):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: wanted {expected}, have {row}")
        await asyncio.sleep(0.02)


async def effects(runtime: Runtime, job_id: int | None = None) -> list[tuple[int, int, int]]:
    async with runtime.db.session() as session:
        rows = await session.execute(
            text(
                "SELECT job_id, token, pid FROM job_test_effects "
                "WHERE CAST(:id AS bigint) IS NULL OR job_id = :id ORDER BY id"
            ),
            {"id": job_id},
        )
        return [tuple(r) for r in rows]


async def add(runtime: Runtime, name: str, payload: dict[str, object]) -> int:
    async with runtime.db.session() as session:
        job_id = await enqueue(session, name, payload)
    assert job_id is not None
    return job_id


@pytest.mark.timeout(300)  # worker processes start on a loaded box first (``_wait_started``)
class TestStalledJobs:
    async def test_sigkill_mid_job_reruns_within_lease_plus_check_counted_as_one_stall(
        self, jobs_db: Runtime, tmp_path: Path
    ) -> None:
        job_id = await add(jobs_db, "test.slow", {"seconds": 1.0})
        with worker_process(jobs_db, "t_slow", tmp_path / "a.log") as a:
            await wait_row(jobs_db, job_id, state="active", worker=worker_name(a))
            async with in_process_worker(jobs_db, ["t_slow"]) as survivor:
                a.kill()
                killed_at = time.time()
                row = await wait_row(jobs_db, job_id, timeout=10, state="succeeded")
        assert row["worker"] == survivor.name
        assert row["stalls"] == 1
        assert row["attempts"] == 2
        rerun_after = row["dispatched_at"].timestamp() - killed_at  # type: ignore[attr-defined]
        # lease (1 s) + check interval (0.3 s, jittered ±20 %) + slack for a loaded 2-core
        # box (the lease is renewed every 0.25 s, so it expires ≤ 1 s after the kill).
        assert rerun_after <= LEASE + CHECK * 1.2 + 1.0, rerun_after
        # Exactly one effect committed: the one of the attempt that completed.
        assert [(j, t) for j, t, _ in await effects(jobs_db, job_id)] == [
            (job_id, row["lease_token"])
        ]

    @pytest.mark.timeout(300)
    async def test_a_job_that_kills_its_worker_every_time_ends_failed(
        self, jobs_db: Runtime, tmp_path: Path
    ) -> None:
        """Fleet of 2 with max_stalled 1: run, die, re-run, die, failed — the fleet restarted
        the children it lost, and its metrics endpoint counted both stalls."""
        log = tmp_path / "fleet.log"
        port = free_port()
        env = worker_env(
            jobs_db, SURGE_JOBS_MAX_STALLED="1", SURGE_JOBS_QUEUES="t_suicide",
            SURGE_DATA_DIR=str(tmp_path / "data"),
        )  # fmt: skip
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with log.open("ab") as out:
            fleet = start_fleet(env, out, port)
            try:
                # Both children ready first (interpreter start-up is the loaded box's
                # business), then the job: the 30 s below are the job's, not the start's.
                await eventually(
                    lambda: read_log(log).count("jobs.worker.started") >= 2,
                    timeout=120, interval=0.1, message=f"fleet not ready: {read_log(log)[-2000:]}",
                )  # fmt: skip
                job_id = await add(jobs_db, "test.suicide", {})
                # Two deaths, two stall checks and the fleet's restarts (interpreters again).
                row = await wait_row(jobs_db, job_id, timeout=90, state="failed")
                assert row["stalls"] == 2  # stalled, re-queued; stalled again: > 1 → failed
                assert row["attempts"] == 2
                assert "stalled more than 1 times" in str(row["last_error"])
                await asyncio.sleep(1.5)  # the first restart backoff is 1 s
                assert fleet.poll() is None
                async with httpx.AsyncClient() as http:
                    scraped = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                assert 'surge_jobs_stalled_total{queue="t_suicide"} 2.0' in scraped
                assert 'surge_jobs_failed_total{queue="t_suicide"} 1.0' in scraped
            finally:
                fleet.send_signal(signal.SIGTERM)
                code = fleet.wait(timeout=20)
        output = log.read_text()
        assert output.count("jobs.fleet.child_exited") >= 2
        assert output.count("jobs.fleet.child_started") >= 4  # 2 + 2 restarts
        assert code == 0

    async def test_a_worker_frozen_past_its_lease_cannot_complete_the_job(
        self, jobs_db: Runtime, tmp_path: Path
    ) -> None:
        job_id = await add(jobs_db, "test.slow", {"seconds": 1.0})
        with worker_process(jobs_db, "t_slow", tmp_path / "a.log") as a:
            first = await wait_row(jobs_db, job_id, state="active", worker=worker_name(a))
            os.kill(a.pid, signal.SIGSTOP)  # frozen mid-handler, its effect written
            try:
                async with in_process_worker(jobs_db, ["t_slow"]) as b:
                    row = await wait_row(jobs_db, job_id, timeout=10, state="succeeded")
                    assert row["worker"] == b.name
                    os.kill(a.pid, signal.SIGCONT)  # a wakes up, thinks it still owns it
                    await asyncio.sleep(LEASE)  # its heartbeat and its sleep both fire
            finally:
                os.kill(a.pid, signal.SIGCONT)
            assert a.poll() is None  # a survived, fenced out
        assert row["lease_token"] != first["lease_token"]
        assert row["stalls"] == 1
        final = await job_row(jobs_db, job_id)
        assert final["state"] == "succeeded"
        assert final["lease_token"] == row["lease_token"]
        # a's effect (written before the freeze) rolled back; only b's committed.
        assert [(t, p) for _, t, p in await effects(jobs_db, job_id)] == [
            (row["lease_token"], os.getpid())
        ]
        assert "jobs.lease_lost" in read_log(tmp_path / "a.log")


@pytest.mark.timeout(300)  # worker processes start on a loaded box first (``_wait_started``)
class TestFleet:
    async def test_rate_limit_holds_across_two_worker_processes(
        self, jobs_db: Runtime, tmp_path: Path
    ) -> None:
        limit, period = 5, 1.0
        env = {"SURGE_JOBS_RATE_LIMITS": f"t_limited={limit}/{period}s"}
        with (
            worker_process(jobs_db, "t_limited", tmp_path / "a.log", concurrency=2, **env),
            worker_process(jobs_db, "t_limited", tmp_path / "b.log", concurrency=2, **env),
        ):
            async with jobs_db.db.session() as session:
                # Both running first. 2 processes × concurrency 2 × 0.5 s jobs: one process
                # alone can start at most ~4 per second, so the limit (5/s) is only reached
                # if both share it.
                await enqueue_many(session, "test.limited", [{"seconds": 0.5}] * 20)
            deadline = time.monotonic() + 20
            while True:
                async with jobs_db.db.session() as session:
                    done = await session.scalar(
                        text("SELECT count(*) FROM jobs WHERE name = 'test.limited' "
                             "AND state = 'succeeded'")
                    )  # fmt: skip
                if done == 20 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert done == 20
        async with jobs_db.db.session() as session:
            rows = (
                await session.execute(
                    text(
                        "SELECT dispatched_at, worker FROM jobs WHERE name = 'test.limited' "
                        "ORDER BY dispatched_at"
                    )
                )
            ).all()
        starts = [r[0].timestamp() for r in rows]
        # No window of `period` holds more than `limit` starts: the (limit+1)-th start after
        # any start is at least `period` later.
        gaps = [b - a for a, b in zip(starts, starts[limit:], strict=False)]
        assert min(gaps) >= period - 1e-3, gaps
        assert len({r[1] for r in rows}) == 2  # both processes took part

    async def test_graceful_shutdown_loses_nothing(self, jobs_db: Runtime, tmp_path: Path) -> None:
        async with jobs_db.db.session() as session:
            ids = await enqueue_many(session, "test.slow", [{"seconds": 0.4}] * 12)
        with worker_process(
            jobs_db, "t_slow", tmp_path / "a.log", concurrency=4,
            SURGE_JOBS_SHUTDOWN_GRACE="PT0.1S",
        ) as a:  # fmt: skip
            await wait_row(jobs_db, ids[0], state="active")
            a.send_signal(signal.SIGTERM)
            assert a.wait(timeout=15) == 0
        async with jobs_db.db.session() as session:
            states: dict[str, int] = dict(
                (
                    await session.execute(
                        text(
                            "SELECT state, count(*) FROM jobs WHERE id = ANY(:ids) GROUP BY state"
                        ),
                        {"ids": ids},
                    )
                ).all()
            )
            released_attempts = await session.scalar(
                text("SELECT max(attempts) FROM jobs WHERE id = ANY(:ids) AND state = 'queued'"),
                {"ids": ids},
            )
        assert "active" not in states  # nothing left claimed by a dead worker
        assert states.get("queued", 0) >= 1  # cut short and put back...
        assert released_attempts == 0  # ...without spending an attempt
        assert len(await effects(jobs_db)) == states.get("succeeded", 0)
        async with in_process_worker(jobs_db, ["t_slow"]):
            for job_id in ids:
                await wait_row(jobs_db, job_id, timeout=15, state="succeeded")
        done = await effects(jobs_db)
        assert sorted(j for j, _, _ in done) == sorted(ids)  # each exactly once


@pytest.mark.chaos
class TestDatabaseOutage:
    async def test_workers_pause_while_postgresql_is_down_and_resume(
        self, server_urls: tuple[str, str], tmp_path: Path
    ) -> None:
        """docs/architecture.md §4: PostgreSQL down → workers pause (no crash, no busy loop) and
        resume by themselves; nothing enqueued before or after is lost."""
        from surge.kit.db import migrate
        from tests.fixtures.servers import start_postgres
        from tests.fixtures.settings import make_settings

        assert jobs_handlers
        pg = start_postgres(tmp_path / "pg")
        try:
            await asyncio.to_thread(migrate.upgrade, pg.url)
            runtime = Runtime(make_settings(pg.url, server_urls[1], DB_POOL_MIN=1))
            await runtime.start()
            try:
                async with runtime.db.session() as session:
                    await session.execute(text(EFFECTS_DDL))
                async with in_process_worker(runtime, ["t_record"]) as worker:
                    before = await add(runtime, "test.record", {"note": "before"})
                    await wait_row(runtime, before, state="succeeded")
                    await asyncio.to_thread(pg.stop)
                    await asyncio.sleep(1.5)  # fetches fail and back off meanwhile
                    assert worker.stopping is False
                    await asyncio.to_thread(pg.start)
                    after = await add_when_up(runtime, "test.record", {"note": "after"})
                    await wait_row(runtime, after, timeout=20, state="succeeded")
                assert sorted(n for n in await notes(runtime)) == ["after", "before"]
            finally:
                await runtime.stop()
        finally:
            pg.stop()


async def add_when_up(runtime: Runtime, name: str, payload: dict[str, object]) -> int:
    deadline = time.monotonic() + 20
    while True:
        try:
            return await add(runtime, name, payload)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def notes(runtime: Runtime) -> list[str]:
    async with runtime.db.session() as session:
        rows = await session.execute(text("SELECT note FROM job_test_effects"))
        return [str(r[0]) for r in rows]
