"""A running job taking more jobs of its own kind: for handlers whose per-job cost is mostly
fixed (a connection, a round trip) and is shared by handling several at once.

``claim_more(ctx, limit)`` claims up to ``limit`` ready jobs with the same name and queue
as ``ctx``'s job, exactly as the worker's fetch would (``FOR UPDATE SKIP LOCKED``, a fresh
fencing token and lease each, the attempt counted), except that they are not run by the
worker: the calling handler owns them. It must finish every one of them:

- ``ack(engine, claimed)`` — done (fenced like the worker's batched ack);
- ``complete_in(session, one)`` — done in ``session``'s transaction (its writes and the
  completion commit together, or neither: the worker's ``_complete_in_session`` rule);
- ``release(engine, claimed)`` — not started: back to ``queued``, the attempt not counted;
- while it holds them, ``renew(engine, claimed, lease)`` every lease/4 (the worker's
  heartbeat only knows the jobs it started itself).

A claimed job its handler never finishes (the process was killed) is recovered like any
other: its lease expires, it is ``stalled`` and queued again. Jobs with a ``lock_key`` are
never taken (the worker's one-per-key rule lives in its fetch), and neither are jobs of a
rate-limited queue (every start of those goes through the worker's dispatch log).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydantic_core
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from surge.kit.db import autocommit_fetch, driver_fetch
from surge.kit.jobs._sql import ACK
from surge.kit.jobs.context import JobContext

__all__ = ["Claimed", "ack", "claim_more", "complete_in", "release", "renew"]

_CLAIM_MORE = """
WITH chosen AS (
    SELECT id FROM jobs
    WHERE state = 'queued' AND queue = $1 AND name = $2 AND run_at <= now()
      AND lock_key IS NULL
      AND NOT EXISTS (SELECT 1 FROM job_queue_pauses p WHERE p.queue = $1)
    ORDER BY priority DESC, run_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), stamp AS (SELECT clock_timestamp() AS ts)
UPDATE jobs j SET state = 'active', attempts = j.attempts + 1,
    lease_token = nextval('jobs_lease_token_seq'),
    lease_expires_at = stamp.ts + make_interval(secs => $5::double precision),
    worker = $4, dispatched_at = stamp.ts, started_at = COALESCE(j.started_at, stamp.ts)
FROM chosen, stamp WHERE j.id = chosen.id
RETURNING j.id, j.payload::text, j.attempts, j.lease_token
"""
_RENEW = """
    UPDATE jobs j SET lease_expires_at = clock_timestamp() + make_interval(secs => $3::float8)
    FROM unnest($1::bigint[], $2::bigint[]) AS t(id, token)
    WHERE j.id = t.id AND j.lease_token = t.token AND j.state = 'active'
    RETURNING j.id
"""
_RELEASE = """
    UPDATE jobs j SET state = 'queued', attempts = GREATEST(j.attempts - 1, 0),
        lease_token = NULL, lease_expires_at = NULL, worker = NULL, run_at = now()
    FROM unnest($1::bigint[], $2::bigint[]) AS t(id, token)
    WHERE j.id = t.id AND j.lease_token = t.token AND j.state = 'active'
    RETURNING j.id
"""
_COMPLETE = (
    "UPDATE jobs SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL "
    "WHERE id = $1 AND lease_token = $2 AND state = 'active' RETURNING id"
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job taken by a running handler (``claim_more``)."""

    id: int
    payload: dict[str, Any]
    attempt: int
    token: int


def _worker_name(ctx: JobContext) -> str:
    worker = ctx.runtime.extensions.get("jobs.worker")
    name = getattr(worker, "name", None)
    return str(name) if name else f"{socket.gethostname()}:{os.getpid()}"


async def claim_more(ctx: JobContext, limit: int) -> list[Claimed]:
    """Up to ``limit`` more ready jobs named like ``ctx``'s, in its queue, now owned by the
    caller (see the module's rules). Empty for a rate-limited queue or ``limit < 1``."""
    settings = ctx.runtime.settings
    if limit < 1 or ctx.queue in settings.JOBS_RATE_LIMITS:
        return []
    lease = settings.JOBS_LEASE.total_seconds()
    rows = await autocommit_fetch(
        ctx.runtime.db.primary, _CLAIM_MORE, ctx.queue, ctx.name, limit, _worker_name(ctx), lease
    )
    return [
        Claimed(row[0], pydantic_core.from_json(row[1]), row[2], row[3])
        for row in sorted(rows, key=lambda row: row[0])
    ]


def _columns(claimed: Sequence[Claimed]) -> tuple[list[int], list[int]]:
    return [c.id for c in claimed], [c.token for c in claimed]


async def ack(engine: AsyncEngine, claimed: Sequence[Claimed]) -> set[int]:
    """Mark ``claimed`` succeeded in one statement; the ids whose attempt still held the
    lease (the others were taken over after their lease expired: nothing written)."""
    if not claimed:
        return set()
    return {row[0] for row in await autocommit_fetch(engine, ACK, *_columns(claimed))}


async def complete_in(session: AsyncSession, one: Claimed) -> bool:
    """Mark ``one`` succeeded inside ``session``'s unit of work (the caller commits; False:
    the lease was lost, the caller must roll back)."""
    return bool(await driver_fetch(session, _COMPLETE, one.id, one.token))


async def release(engine: AsyncEngine, claimed: Sequence[Claimed]) -> set[int]:
    """Put ``claimed`` back, not started (their attempt is not counted)."""
    if not claimed:
        return set()
    return {row[0] for row in await autocommit_fetch(engine, _RELEASE, *_columns(claimed))}


async def renew(engine: AsyncEngine, claimed: Sequence[Claimed], lease: float) -> set[int]:
    """Extend the leases of ``claimed`` by ``lease`` seconds; the ids still owned."""
    if not claimed:
        return set()
    ids, tokens = _columns(claimed)
    return {row[0] for row in await autocommit_fetch(engine, _RENEW, ids, tokens, lease)}
