"""The worker's SQL: each statement is one atomic step (fetch, ack, heartbeat, release,
retry, stall recovery, schedules, pruning), most run in autocommit."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text

RATE_LOCK_NAMESPACE = 7_421_002  # pg_advisory_xact_lock(namespace, hashtext(queue))

# The two statements of the dispatch loop, in asyncpg's ``$n`` form: the worker sends them as
# prepared statements on the driver connection (``surge.kit.jobs._driver``, ADR 0025).
# FETCH: $1 queues text[], $2 limit, $3 worker, $4 lease seconds.
#
# Each queue is read through its own ordered scan of ``ix_jobs_fetch`` (queue, priority DESC,
# run_at, id), so a fetch reads about ``limit`` index entries however deep the queue is.
# ``queue = ANY(array)`` cannot use that order: PostgreSQL read every ready job, anti-joined
# each with the pauses and sorted them all — 10 ms a fetch at a depth of 10 000, the bulk
# of the server's time per job (ADR 0025). A paused queue is checked once, not per job.
FETCH = """
WITH candidates AS (
    SELECT c.id, c.lock_key, c.priority, c.run_at
    FROM unnest($1::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT id, lock_key, priority, run_at FROM jobs
        WHERE state = 'queued' AND queue = q.name AND run_at <= now()
          AND (lock_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM jobs running WHERE running.lock_key = jobs.lock_key
                  AND running.state = 'active'))
        ORDER BY priority DESC, run_at, id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE NOT EXISTS (SELECT 1 FROM job_queue_pauses p WHERE p.queue = q.name)
), chosen AS (
    SELECT id FROM (
        SELECT DISTINCT ON (COALESCE(lock_key, id::text)) id, priority, run_at FROM candidates
        ORDER BY COALESCE(lock_key, id::text), priority DESC, run_at, id
    ) AS one_per_lock_key
    ORDER BY priority DESC, run_at, id
    LIMIT $2
), stamp AS (SELECT clock_timestamp() AS ts)
UPDATE jobs j SET state = 'active', attempts = j.attempts + 1,
    lease_token = nextval('jobs_lease_token_seq'),
    lease_expires_at = stamp.ts + make_interval(secs => $4::double precision),
    worker = $3, dispatched_at = stamp.ts, started_at = COALESCE(j.started_at, stamp.ts)
FROM chosen, stamp WHERE j.id = chosen.id
RETURNING j.id, j.name, j.queue, j.payload::text, j.attempts, j.max_attempts, j.lease_token,
    j.stalls
"""
# ACK: $1 ids bigint[], $2 tokens bigint[] (fenced: only the attempt holding the lease).
ACK = """
    UPDATE jobs j SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL
    FROM unnest($1::bigint[], $2::bigint[]) AS t(id, token)
    WHERE j.id = t.id AND j.lease_token = t.token AND j.state = 'active'
    RETURNING j.id
"""

_COMPLETE_ONE = text(
    "UPDATE jobs SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL "
    "WHERE id = :id AND lease_token = :token AND state = 'active' RETURNING id"
)

_HEARTBEAT = text(
    """
    UPDATE jobs j SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease)
    FROM unnest(CAST(:ids AS bigint[]), CAST(:tokens AS bigint[])) AS t(id, token)
    WHERE j.id = t.id AND j.lease_token = t.token AND j.state = 'active'
    RETURNING j.id
    """
)

_RELEASE = text(
    """
    UPDATE jobs j SET state = 'queued', attempts = GREATEST(j.attempts - 1, 0),
        lease_token = NULL, lease_expires_at = NULL, worker = NULL, run_at = now()
    FROM unnest(CAST(:ids AS bigint[]), CAST(:tokens AS bigint[])) AS t(id, token)
    WHERE j.id = t.id AND j.lease_token = t.token AND j.state = 'active'
    RETURNING j.id
    """
)

# A snoozed start (:uncount = 1) is given back twice: its attempt, and its entry in the
# rate-limited queue's dispatch log (one row of its queue and dispatch time; a batch claimed
# together shares the time, so each snoozed job removes one): the start did nothing the
# limit protects (ADR 0060). A queue without a limit has no row, and nothing is deleted.
_FAIL_OR_RETRY = text(
    """
    WITH retried AS (
        UPDATE jobs SET state = :state, last_error = :error, lease_expires_at = NULL,
            attempts = GREATEST(attempts - :uncount, 0),
            run_at = CASE WHEN :state = 'queued' THEN now() + make_interval(secs => :delay)
                     ELSE run_at END,
            finished_at = CASE WHEN :state = 'failed' THEN now() ELSE NULL END
        WHERE id = :id AND lease_token = :token AND state = 'active'
        RETURNING id, queue, dispatched_at
    ), given_back AS (
        DELETE FROM job_dispatches WHERE ctid = (
            SELECT d.ctid FROM job_dispatches d JOIN retried r
                ON d.queue = r.queue AND d.dispatched_at = r.dispatched_at
            WHERE :uncount = 1 LIMIT 1
        )
    )
    SELECT id FROM retried
    """
)

_STALLED = text(
    """
    WITH expired AS (
        SELECT id FROM jobs
        WHERE state = 'active' AND lease_expires_at < clock_timestamp()
        ORDER BY lease_expires_at LIMIT 500
        FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs j SET stalls = j.stalls + 1,
        state = CASE WHEN j.stalls + 1 > COALESCE(j.max_stalled, :max_stalled)
                THEN 'failed' ELSE 'queued' END,
        finished_at = CASE WHEN j.stalls + 1 > COALESCE(j.max_stalled, :max_stalled)
                      THEN now() ELSE NULL END,
        last_error = 'stalled: lease expired on worker ' || COALESCE(j.worker, '?')
            || CASE WHEN j.stalls + 1 > COALESCE(j.max_stalled, :max_stalled)
               THEN ' (stalled more than ' || COALESCE(j.max_stalled, :max_stalled)
                    || ' times)' ELSE '' END,
        lease_token = NULL, lease_expires_at = NULL, run_at = now()
    FROM expired WHERE j.id = expired.id
    RETURNING j.id, j.name, j.queue, j.stalls, j.state, j.worker
    """
)


def _pairs(items: Iterable[tuple[int, int]]) -> dict[str, list[int]]:
    ids, tokens = [], []
    for job_id, token in items:
        ids.append(job_id)
        tokens.append(token)
    return {"ids": ids, "tokens": tokens}


_SCHEDULE_INSERT = text(
    "INSERT INTO job_schedules (name, next_run_at) VALUES (:name, :at) "
    "ON CONFLICT (name) DO NOTHING"
)
_SCHEDULE_DUE = text(
    "SELECT next_run_at FROM job_schedules WHERE name = :name "
    "AND next_run_at <= now() FOR UPDATE SKIP LOCKED"
)
_SCHEDULE_ADVANCE = text("UPDATE job_schedules SET next_run_at = :at WHERE name = :name")
_PRUNE_DISPATCHES = text(
    "DELETE FROM job_dispatches WHERE dispatched_at < now() - make_interval(secs => :secs)"
)
# Failed jobs are never pruned: they wait for a retry or a human.
_PRUNE_FINISHED = text(
    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs "
    "WHERE state IN ('succeeded', 'cancelled') "
    "AND finished_at < now() - make_interval(secs => :secs) LIMIT 10000)"
)
