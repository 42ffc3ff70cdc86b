"""Producer side: enqueue in the caller's transaction, bulk, batches, status, retry, cancel.

Every function takes the caller's ``AsyncSession`` first and runs on its connection, inside
its transaction: the job exists exactly when the caller's writes commit (docs/architecture.md §2).
Nothing here commits.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from surge.kit.db import driver_fetch, observe_statement, sync_engine_of
from surge.kit.jobs import _driver
from surge.kit.jobs.errors import JobNotFound, JobStateConflict, UnknownJob
from surge.kit.jobs.registry import JobSpec, get_spec

Payload = Mapping[str, Any] | BaseModel | None
T = TypeVar("T")

# Restates the partial unique index's predicate so PostgreSQL infers it as the arbiter.
_ON_CONFLICT = (
    "ON CONFLICT (dedup_key) WHERE state IN ('queued', 'active') AND dedup_key IS NOT NULL "
    "DO NOTHING"
)

_INSERT_MANY = text(
    f"""
    INSERT INTO jobs (queue, name, payload, priority, run_at, max_attempts, max_stalled,
                      dedup_key, lock_key)
    SELECT :queue, :name, CAST(t.payload AS jsonb), :priority,
           COALESCE(CAST(:run_at AS timestamptz), now())
               + make_interval(secs => CAST(:delay AS double precision)),
           :max_attempts, :max_stalled, t.dedup_key, t.lock_key
    FROM unnest(CAST(:payloads AS text[]), CAST(:dedup_keys AS text[]),
                CAST(:lock_keys AS text[])) AS t(payload, dedup_key, lock_key)
    {_ON_CONFLICT}
    RETURNING id
    """
)


def _spec(name: str) -> JobSpec:
    spec = get_spec(name)
    if spec is None:
        raise UnknownJob(
            f"no job registered as {name!r}: import the module that defines it "
            "(surge.worker.discover() imports every domain's jobs)"
        )
    return spec


def _dump(payload: Payload) -> str:
    if payload is None:
        return "{}"
    if isinstance(payload, BaseModel):
        return payload.model_dump_json()
    return pydantic_core.to_json(dict(payload)).decode()


def _delay(delay: timedelta | None) -> float:
    return delay.total_seconds() if delay else 0.0


async def enqueue(
    session: AsyncSession,
    name: str,
    payload: Payload = None,
    *,
    dedup_key: str | None = None,
    lock_key: str | None = None,
    run_at: datetime | None = None,
    delay: timedelta | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
) -> int | None:
    """Add one job inside ``session``'s transaction; returns its id, or ``None`` when a job
    with the same ``dedup_key`` is already queued or running (nothing is added).

    ``lock_key``: jobs sharing it never run at the same time (one per account, say).
    ``priority``: higher runs first (default: the job's registered priority).
    ``run_at`` / ``delay``: not before this moment / this long after the commit's clock.

    Adds exactly one statement to the transaction: a prepared ``INSERT`` on the driver
    connection under the session (ADR 0025); when it is the transaction's first statement,
    its BEGIN goes out in the same round trip (``driver_fetch``, ADR 0030).
    """
    params = _one(
        name,
        payload,
        dedup_key=dedup_key,
        lock_key=lock_key,
        run_at=run_at,
        delay=delay,
        priority=priority,
        max_attempts=max_attempts,
    )
    args = tuple(params.values())
    driver = await _driver.in_transaction(session)
    if driver is None:  # the transaction's first statement: BEGIN goes out with it (ADR 0030)
        [row] = await driver_fetch(session, _INSERT_DRIVER, *args) or [(None,)]
        return None if row[0] is None else int(row[0])
    # One prepared INSERT on the connection under the session, inside its transaction
    # (ADR 0025): no compile, no result object; the same statement ``enqueue_now`` sends.
    started = time.perf_counter()
    try:
        value = await driver.fetchval(_INSERT_DRIVER, *args)
    except Exception as error:
        raise _driver.translate(session, _INSERT_DRIVER, args, error) from error
    finally:
        observe_statement(sync_engine_of(session), _INSERT_DRIVER, started)
    return None if value is None else int(value)


def _one(
    name: str,
    payload: Payload,
    *,
    dedup_key: str | None,
    lock_key: str | None,
    run_at: datetime | None,
    delay: timedelta | None,
    priority: int | None,
    max_attempts: int | None,
) -> dict[str, Any]:
    """One job's row, in ``_INSERT_DRIVER``'s parameter order."""
    spec = _spec(name)
    return {
        "queue": spec.queue,
        "name": name,
        "payload": _dump(payload),
        "priority": spec.priority if priority is None else priority,
        "run_at": run_at,
        "delay": _delay(delay),
        "max_attempts": max_attempts if max_attempts is not None else spec.max_attempts,
        "max_stalled": spec.max_stalled,
        "dedup_key": dedup_key,
        "lock_key": lock_key,
    }


_INSERT_DRIVER = f"""
    INSERT INTO jobs (queue, name, payload, priority, run_at, max_attempts, max_stalled,
                      dedup_key, lock_key)
    VALUES ($1, $2, $3::jsonb, $4, COALESCE($5::timestamptz, now()) + make_interval(secs => $6),
            $7, $8, $9, $10)
    {_ON_CONFLICT}
    RETURNING id
"""


async def enqueue_now(
    engine: AsyncEngine,
    name: str,
    payload: Payload = None,
    *,
    dedup_key: str | None = None,
    lock_key: str | None = None,
    run_at: datetime | None = None,
    delay: timedelta | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
) -> int | None:
    """Add one job as a unit of work of its own: one prepared statement in autocommit mode
    on the driver's connection — one round trip, where a session would add BEGIN and COMMIT
    and SQLAlchemy's per-statement work (``bench/jobs.py``, "enqueue single").

    For a job that must exist exactly when other writes commit, use ``enqueue`` inside
    their transaction instead. Same arguments and result as ``enqueue``."""
    params = _one(
        name,
        payload,
        dedup_key=dedup_key,
        lock_key=lock_key,
        run_at=run_at,
        delay=delay,
        priority=priority,
        max_attempts=max_attempts,
    )
    # Outside any transaction: PostgreSQL runs the statement as its own transaction. asyncpg
    # prepares it once per connection (its statement cache) and reuses it.
    value = await _driver.pooled(engine, _INSERT_DRIVER, tuple(params.values()))
    return None if value is None else int(value)


async def enqueue_many(
    session: AsyncSession,
    name: str,
    payloads: Sequence[Payload],
    *,
    dedup_keys: Sequence[str | None] | None = None,
    lock_keys: Sequence[str | None] | None = None,
    run_at: datetime | None = None,
    delay: timedelta | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
) -> list[int]:
    """Add many jobs of one name in one statement (``unnest``), in ``session``'s
    transaction; returns the ids created (duplicates by ``dedup_key`` are skipped)."""
    if not payloads:
        return []
    count = len(payloads)
    if dedup_keys is not None and len(dedup_keys) != count:
        raise ValueError("dedup_keys must have one entry per payload")
    if lock_keys is not None and len(lock_keys) != count:
        raise ValueError("lock_keys must have one entry per payload")
    spec = _spec(name)
    result = await session.execute(
        _INSERT_MANY,
        {
            "queue": spec.queue,
            "name": name,
            "payloads": [_dump(p) for p in payloads],
            "dedup_keys": list(dedup_keys) if dedup_keys is not None else [None] * count,
            "lock_keys": list(lock_keys) if lock_keys is not None else [None] * count,
            "priority": spec.priority if priority is None else priority,
            "run_at": run_at,
            "delay": _delay(delay),
            "max_attempts": max_attempts if max_attempts is not None else spec.max_attempts,
            "max_stalled": spec.max_stalled,
        },
    )
    return list(result.scalars())


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``size`` items."""
    if size < 1:
        raise ValueError("size must be ≥ 1")
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def enqueue_batches(
    session: AsyncSession,
    name: str,
    items: Iterable[Any],
    *,
    batch_size: int = 50,
    key: str = "items",
    extra: Mapping[str, Any] | None = None,
    dedup_prefix: str | None = None,
    delay: timedelta | None = None,
) -> list[int]:
    """Split ``items`` into jobs of ``batch_size`` (seed 001: "credit these 10 000 accounts in
    batches of 50"), each job's payload ``{key: [...], **extra}``, all in one statement and
    in ``session``'s transaction. ``dedup_prefix`` makes the split idempotent: batch ``i``
    gets dedup key ``f"{dedup_prefix}:{i}"``. Each batch is one job = one transaction, so a
    batch either fully applies or is retried."""
    payloads: list[Payload] = []
    for chunk in chunked(items, batch_size):
        payloads.append({key: chunk, **(extra or {})})
    dedup = [f"{dedup_prefix}:{i}" for i in range(len(payloads))] if dedup_prefix else None
    return await enqueue_many(session, name, payloads, dedup_keys=dedup, delay=delay)


# ---- status -------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobInfo:
    """A job's state as stored (``queued | active | succeeded | failed | cancelled``)."""

    id: int
    name: str
    queue: str
    state: str
    payload: dict[str, Any]
    priority: int
    attempts: int
    stalls: int
    max_attempts: int | None
    dedup_key: str | None
    lock_key: str | None
    last_error: str | None
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_COLUMNS = (
    "id, name, queue, state, payload::text AS payload, priority, attempts, stalls, "
    "max_attempts, dedup_key, lock_key, last_error, run_at, created_at, started_at, "
    "finished_at, worker"
)


def _info(row: Any) -> JobInfo:
    values = dict(row._mapping)
    values["payload"] = pydantic_core.from_json(values["payload"])
    return JobInfo(**values)


async def get_job(session: AsyncSession, job_id: int) -> JobInfo | None:
    """The job's current state, or ``None``."""
    row = (
        await session.execute(text(f"SELECT {_COLUMNS} FROM jobs WHERE id = :id"), {"id": job_id})
    ).first()
    return _info(row) if row else None


async def recent_failures(session: AsyncSession, *, limit: int = 20) -> list[JobInfo]:
    """Failed jobs, newest first (they are retained until retried or purged by hand)."""
    rows = await session.execute(
        text(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'failed' "
            "ORDER BY finished_at DESC NULLS LAST, id DESC LIMIT :limit"
        ),
        {"limit": limit},
    )
    return [_info(row) for row in rows]


async def retry_job(session: AsyncSession, job_id: int) -> JobInfo:
    """Put a failed or cancelled job back in its queue, now, with a fresh attempt count.

    Raises ``JobNotFound``, or ``JobStateConflict`` when it is not failed/cancelled or another
    job with its dedup key is already waiting."""
    try:
        async with session.begin_nested():
            row = (
                await session.execute(
                    text(
                        "UPDATE jobs SET state = 'queued', attempts = 0, stalls = 0, "
                        "run_at = now(), finished_at = NULL, lease_token = NULL, "
                        "lease_expires_at = NULL, worker = NULL "
                        "WHERE id = :id AND state IN ('failed', 'cancelled') RETURNING id"
                    ),
                    {"id": job_id},
                )
            ).first()
    except IntegrityError as error:
        raise JobStateConflict(
            f"job {job_id}: another job with the same dedup key is waiting"
        ) from error
    info = await get_job(session, job_id)
    if info is None:
        raise JobNotFound(f"no job {job_id}")
    if row is None:
        raise JobStateConflict(f"job {job_id} is {info.state}, only failed or cancelled jobs retry")
    return info


async def cancel_job(session: AsyncSession, job_id: int) -> bool:
    """Cancel a job that has not started (``queued``); returns False if it already started."""
    row = (
        await session.execute(
            text(
                "UPDATE jobs SET state = 'cancelled', finished_at = now() "
                "WHERE id = :id AND state = 'queued' RETURNING id"
            ),
            {"id": job_id},
        )
    ).first()
    return row is not None


@dataclass(frozen=True)
class QueueStats:
    """One queue's depth and lag (``oldest_age_seconds``: how late the oldest ready job is)."""

    queue: str
    ready: int
    scheduled: int
    active: int
    oldest_age_seconds: float


async def queue_stats(session: AsyncSession, known: Iterable[str] = ()) -> list[QueueStats]:
    """Per-queue depth and lag, read from the two partial indexes (queued, active) only.
    Every queue in ``known`` is listed too, with zeros when idle: an idle queue is a
    queue, not a missing one."""
    rows = await session.execute(
        text(
            """
            SELECT queue,
                   count(*) FILTER (WHERE state = 'queued' AND run_at <= now()) AS ready,
                   count(*) FILTER (WHERE state = 'queued' AND run_at > now()) AS scheduled,
                   count(*) FILTER (WHERE state = 'active') AS active,
                   COALESCE(EXTRACT(EPOCH FROM now() - min(run_at)
                       FILTER (WHERE state = 'queued' AND run_at <= now())), 0)::float8
                       AS oldest_age_seconds
            FROM jobs WHERE state IN ('queued', 'active')
            GROUP BY queue ORDER BY queue
            """
        )
    )
    found = {row.queue: QueueStats(**dict(row._mapping)) for row in rows}
    for queue in known:
        found.setdefault(queue, QueueStats(queue, 0, 0, 0, 0.0))
    return [found[queue] for queue in sorted(found)]


async def finished_counts(session: AsyncSession, *, since: timedelta) -> dict[str, dict[str, int]]:
    """Per queue, jobs that succeeded / failed / were cancelled in the last ``since``, and
    every failed job still retained (``failed_total``)."""
    rows = await session.execute(
        text(
            """
            SELECT queue, state, count(*) AS n,
                   count(*) FILTER (WHERE finished_at > now() - make_interval(secs => :secs))
                       AS recent
            FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')
            GROUP BY queue, state
            """
        ),
        {"secs": since.total_seconds()},
    )
    out: dict[str, dict[str, int]] = {}
    for queue, state, total, recent in rows:
        entry = out.setdefault(queue, {})
        entry[state] = int(recent)
        if state == "failed":
            entry["failed_total"] = int(total)
    return out


# ---- operator actions: pause/resume, filtered bulk actions with a dry-run count ------------
async def pause_queue(session: AsyncSession, queue: str, *, by: str | None = None) -> bool:
    """Workers stop taking ``queue``'s jobs (running ones finish); False if already paused."""
    row = (
        await session.execute(
            text(
                "INSERT INTO job_queue_pauses (queue, paused_by) VALUES (:q, :by) "
                "ON CONFLICT (queue) DO NOTHING RETURNING queue"
            ),
            {"q": queue, "by": by},
        )
    ).first()
    return row is not None


async def resume_queue(session: AsyncSession, queue: str) -> bool:
    """Workers take ``queue``'s jobs again; False if it was not paused."""
    row = (
        await session.execute(
            text("DELETE FROM job_queue_pauses WHERE queue = :q RETURNING queue"), {"q": queue}
        )
    ).first()
    return row is not None


async def paused_queues(session: AsyncSession) -> dict[str, datetime]:
    rows = await session.execute(text("SELECT queue, paused_at FROM job_queue_pauses"))
    out: dict[str, datetime] = {}
    for queue, at in rows:
        out[queue] = at
    return out


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a list or a bulk action is about; empty fields match everything.
    ``search`` matches the payload's text (``payload::text ILIKE``) or the last error."""

    queue: str | None = None
    state: str | None = None
    name: str | None = None
    search: str | None = None
    job_id: int | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses: list[str] = ["TRUE"]
        params: dict[str, Any] = {}
        if self.job_id is not None:
            clauses.append("id = :f_id")
            params["f_id"] = self.job_id
        if self.queue:
            clauses.append("queue = :f_queue")
            params["f_queue"] = self.queue
        if self.state:
            clauses.append("state = :f_state")
            params["f_state"] = self.state
        if self.name:
            clauses.append("name = :f_name")
            params["f_name"] = self.name
        if self.search:
            clauses.append("(payload::text ILIKE :f_search OR last_error ILIKE :f_search)")
            escaped = self.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params["f_search"] = f"%{escaped}%"
        return " AND ".join(clauses), params


#: Bulk action -> (states it applies to, the UPDATE/DELETE it runs on the matching ids).
BULK_ACTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "retry": (
        ("failed", "cancelled"),
        "UPDATE jobs SET state = 'queued', attempts = 0, stalls = 0, run_at = now(), "
        "finished_at = NULL, lease_token = NULL, lease_expires_at = NULL, worker = NULL, "
        "last_error = NULL WHERE id = ANY(CAST(:ids AS bigint[])) AND state IN ('failed', 'cancelled')",
    ),
    "cancel": (
        ("queued",),
        "UPDATE jobs SET state = 'cancelled', finished_at = now() "
        "WHERE id = ANY(CAST(:ids AS bigint[])) AND state = 'queued'",
    ),
    "delete": (
        ("succeeded", "failed", "cancelled"),
        "DELETE FROM jobs WHERE id = ANY(CAST(:ids AS bigint[])) AND state IN ('succeeded', 'failed', 'cancelled')",
    ),
}


async def list_jobs(session: AsyncSession, flt: JobFilter, *, limit: int = 50) -> list[JobInfo]:
    where, params = flt.where()
    rows = await session.execute(
        text(f"SELECT {_COLUMNS} FROM jobs WHERE {where} ORDER BY id DESC LIMIT :limit"),
        {**params, "limit": limit},
    )
    return [_info(row) for row in rows]


async def bulk_count(session: AsyncSession, action: str, flt: JobFilter) -> int:
    """The dry run: how many jobs ``bulk_apply(action, flt)`` would change now."""
    states, _ = BULK_ACTIONS[action]
    where, params = flt.where()
    count = await session.scalar(
        text(f"SELECT count(*) FROM jobs WHERE {where} AND state = ANY(CAST(:states AS text[]))"),
        {**params, "states": list(states)},
    )
    return int(count or 0)


async def bulk_apply(session: AsyncSession, action: str, flt: JobFilter, *, limit: int) -> int:
    """Apply ``action`` to at most ``limit`` matching jobs (a retry that would collide with
    a waiting job of the same dedup key is skipped); returns how many changed."""
    states, statement = BULK_ACTIONS[action]
    where, params = flt.where()
    ids = list(
        (
            await session.execute(
                text(
                    f"SELECT id FROM jobs WHERE {where} AND state = ANY(CAST(:states AS text[])) "
                    "ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
                ),
                {**params, "states": list(states), "limit": limit},
            )
        ).scalars()
    )
    changed = 0
    for chunk in chunked(ids, 500):
        try:
            async with session.begin_nested():
                result = await session.execute(text(statement), {"ids": chunk})
                changed += int(getattr(result, "rowcount", 0) or 0)
        except IntegrityError:  # a dedup key collides: one by one, skipping the collisions
            for job_id in chunk:
                with contextlib.suppress(IntegrityError):
                    async with session.begin_nested():
                        result = await session.execute(text(statement), {"ids": [job_id]})
                        changed += int(getattr(result, "rowcount", 0) or 0)
    return changed
