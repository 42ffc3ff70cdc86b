"""Jobs used by the kit.jobs tests, imported by in-process workers and by worker
subprocesses (``SURGE_JOBS_MODULES=tests.kit.jobs_handlers``). Each writes what it saw to
``job_test_effects`` through ``ctx.session``, so the effect commits only with the job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from datetime import timedelta

from sqlalchemy import text

from surge.kit.jobs import JobContext, Snooze, job

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS job_test_effects (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL,
    token bigint NOT NULL,
    pid integer NOT NULL,
    note text,
    started_at timestamptz NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


async def record(ctx: JobContext, note: str | None = None) -> None:
    await ctx.session.execute(
        text(
            "INSERT INTO job_test_effects (job_id, token, pid, note, started_at) "
            "VALUES (:job, :token, :pid, :note, "
            "COALESCE(CAST(:started AS timestamptz), clock_timestamp()))"
        ),
        {"job": ctx.id, "token": ctx.token, "pid": os.getpid(), "note": note,
         "started": ctx.payload.get("_started")},
    )  # fmt: skip


@job("test.noop", queue="t_noop")
async def noop(ctx: JobContext) -> None:
    return None


@job("test.record", queue="t_record")
async def record_job(ctx: JobContext) -> None:
    await record(ctx, ctx.payload.get("note"))


#: When each attempt of a ``test.fail`` job started (this process's monotonic clock), by job
#: id: an in-process worker's test reads the real gaps between attempts here.
FAIL_STARTS: dict[int, list[float]] = {}


@job("test.fail", queue="t_fail", max_attempts=3, backoff=timedelta(milliseconds=200))
async def fail(ctx: JobContext) -> None:
    FAIL_STARTS.setdefault(ctx.id, []).append(time.monotonic())
    raise RuntimeError(f"boom on attempt {ctx.attempt}")


@job("test.snooze", queue="t_snooze", max_attempts=2, backoff=timedelta(milliseconds=50))
async def snooze(ctx: JobContext) -> None:
    """Snoozes ``ctx.payload["snoozes"]`` times (counted in ``job_test_effects``), writing a
    row each time that the snooze must roll back, then records ``done``."""
    seen = await ctx.session.scalar(
        text("SELECT count(*) FROM job_test_effects WHERE job_id = :job AND note = 'start'"),
        {"job": ctx.id},
    )
    async with ctx.runtime.db.session() as own:  # committed at once: survives the snooze
        await own.execute(
            text(
                "INSERT INTO job_test_effects (job_id, token, pid, note, started_at) "
                "VALUES (:job, :token, :pid, 'start', clock_timestamp())"
            ),
            {"job": ctx.id, "token": ctx.token, "pid": os.getpid()},
        )
        await own.commit()
    await record(ctx, f"attempt {ctx.attempt}")
    if int(seen or 0) < int(ctx.payload["snoozes"]):
        raise Snooze(timedelta(milliseconds=30), "pool empty")
    await record(ctx, "done")


@job("test.suicide", queue="t_suicide")
async def suicide(ctx: JobContext) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@job("test.slow", queue="t_slow")
async def slow(ctx: JobContext) -> None:
    """Records, then sleeps: the row is written early but commits only with the job."""
    await record(ctx, "slow")
    await asyncio.sleep(float(ctx.payload.get("seconds", 1.0)))


@job("test.locked", queue="t_locked")
async def locked(ctx: JobContext) -> None:
    started = await ctx.session.scalar(text("SELECT clock_timestamp()"))
    await asyncio.sleep(0.05)
    await ctx.session.execute(
        text(
            "INSERT INTO job_test_effects (job_id, token, pid, note, started_at) "
            "VALUES (:job, :token, :pid, :note, :started)"
        ),
        {"job": ctx.id, "token": ctx.token, "pid": os.getpid(),
         "note": ctx.payload["key"], "started": started},
    )  # fmt: skip


@job("test.limited", queue="t_limited")
async def limited(ctx: JobContext) -> None:
    await asyncio.sleep(float(ctx.payload.get("seconds", 0)))


@job("test.commits", queue="t_commits", max_attempts=1)
async def commits(ctx: JobContext) -> None:
    """Breaks the rule: commits its own session (which would bypass the fencing)."""
    await record(ctx, "self-committed")
    await ctx.session.commit()


@job("test.savepoint", queue="t_savepoint", max_attempts=1)
async def savepoint(ctx: JobContext) -> None:
    """One item fails inside a savepoint; the others commit with the job."""
    await record(ctx, "before")
    with contextlib.suppress(RuntimeError):
        async with ctx.session.begin_nested():
            await record(ctx, "rolled-back")
            raise RuntimeError("this item failed")
    async with ctx.session.begin_nested():
        await record(ctx, "after")
