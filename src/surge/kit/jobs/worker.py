"""Consumer side: one worker process = one ``Worker`` running C jobs at a time.

The loop, in one process:

- **fetch**: one statement claims up to ``free slots`` ready jobs (``FOR UPDATE SKIP
  LOCKED``), marks them ``active``, gives each attempt a fresh fencing token from a sequence
  and a lease (``now() + JOBS_LEASE``). Rate-limited queues are fetched one at a time under
  a transaction-scoped advisory lock and a sliding log of dispatch times, so "N per period"
  holds across every process. Idle workers sleep on ``LISTEN surge_jobs`` (the insert
  trigger's NOTIFY arrives at the enqueuer's commit), with a poll as a fallback.
- **run**: the handler gets a lazy unit-of-work session; if it used it, the completion
  ``UPDATE ... WHERE lease_token = :token`` runs in that same transaction, so a worker that
  lost its lease cannot commit anything. Jobs that never touched the database are acked in
  batches (the ``UPDATE`` is fenced the same way).
- **heartbeat**: every lease/4 the process renews the leases of the attempts it owns; an
  attempt whose renewal finds another token is cancelled at once (``jobs.lease_lost``).
- **maintenance** every ``JOBS_STALLED_CHECK``: expired leases are ``stalled`` (logged,
  counted, re-queued; failed once a job stalled more than ``max_stalled`` times — BullMQ's
  ``maxStalledCount`` rule), periodic jobs whose slot came are enqueued (one worker wins
  each slot), the dispatch log and old finished jobs are pruned, depth/lag gauges refreshed.
- **shutdown** (SIGTERM/SIGINT): stop fetching, let running jobs finish for
  ``JOBS_SHUTDOWN_GRACE``, cancel the rest and put them back (not counted as attempts).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import socket
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic_core
import structlog
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from surge.kit.db import is_unavailable, run_on_commit
from surge.kit.jobs import metrics
from surge.kit.jobs.context import JobContext
from surge.kit.jobs.errors import LeaseLost
from surge.kit.jobs.queue import enqueue, queue_stats
from surge.kit.jobs.registry import JobSpec, get_spec, registered
from surge.kit.jobs.schema import NOTIFY_CHANNEL
from surge.kit.runtime import Runtime

log = structlog.get_logger()

RATE_LOCK_NAMESPACE = 7_421_002  # pg_advisory_xact_lock(namespace, hashtext(queue))
_RUNNER_COMMIT = "surge_jobs_runner_commit"


class JobSession(Session):
    """The sync session class behind a job's ``AsyncSession``: only the runner commits it."""


@event.listens_for(JobSession, "before_commit")
def _refuse_handler_commit(session: Session) -> None:
    # SQLAlchemy fires before_commit for a savepoint's release too: a handler may use
    # ``begin_nested()`` (one failing item must not abort the whole unit of work).
    if session.in_nested_transaction():
        return
    if not session.info.get(_RUNNER_COMMIT):
        raise RuntimeError(
            "a job handler must not commit ctx.session: the runner commits it together with "
            "the job's fenced completion (flush instead)"
        )


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` job starts per ``period`` in a queue, across every process."""

    limit: int
    period: timedelta

    @classmethod
    def parse(cls, value: str) -> RateLimit:
        """``"50/min"``, ``"10/s"``, ``"1000/hour"``, ``"5/2s"``."""
        count, _, unit = value.replace(" ", "").partition("/")
        units = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
                 "hour": 3600, "d": 86400, "day": 86400}  # fmt: skip
        number = ""
        while unit and (unit[0].isdigit() or unit[0] == "."):
            number, unit = number + unit[0], unit[1:]
        if unit not in units or not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad rate limit {value!r} (expected e.g. '50/min')")
        return cls(int(count), timedelta(seconds=float(number or 1) * units[unit]))


@dataclass(frozen=True)
class WorkerConfig:
    """How one worker process runs. ``from_settings`` reads the ``JOBS_*`` settings."""

    queues: Sequence[str]
    concurrency: int = 8
    lease: timedelta = timedelta(seconds=120)
    stalled_check: timedelta = timedelta(seconds=30)
    max_stalled: int = 2
    max_attempts: int = 3
    backoff: timedelta = timedelta(seconds=5)
    backoff_max: timedelta = timedelta(hours=1)
    poll_interval: timedelta = timedelta(seconds=1)
    shutdown_grace: timedelta = timedelta(seconds=30)
    retention: timedelta = timedelta(days=7)
    rate_limits: dict[str, RateLimit] = field(default_factory=dict)

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> WorkerConfig:
        chosen = list(queues or settings.JOBS_QUEUES or [])
        if not chosen:
            chosen = sorted({spec.queue for spec in registered().values()} | {"default"})
        return cls(
            queues=chosen,
            concurrency=concurrency or settings.JOBS_CONCURRENCY,
            lease=settings.JOBS_LEASE,
            stalled_check=settings.JOBS_STALLED_CHECK,
            max_stalled=settings.JOBS_MAX_STALLED,
            max_attempts=settings.JOBS_MAX_ATTEMPTS,
            backoff=settings.JOBS_BACKOFF,
            backoff_max=settings.JOBS_BACKOFF_MAX,
            poll_interval=settings.JOBS_POLL_INTERVAL,
            shutdown_grace=settings.JOBS_SHUTDOWN_GRACE,
            retention=settings.JOBS_RETENTION,
            rate_limits={q: RateLimit.parse(v) for q, v in settings.JOBS_RATE_LIMITS.items()},
        )


def backoff_delay(attempt: int, base: timedelta, cap: timedelta, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": the ``n``-th failure waits between half and
    all of ``min(cap, base × 2^(n-1))`` — spread out (no thundering herd) yet never shorter
    than half the nominal delay."""
    nominal = min(cap.total_seconds(), base.total_seconds() * 2.0 ** max(0, attempt - 1))
    return float(nominal / 2 + rng.uniform(0, nominal / 2))


@dataclass
class _Claim:
    id: int
    name: str
    queue: str
    payload: str
    attempts: int
    max_attempts: int | None
    token: int
    stalls: int


@dataclass
class _Running:
    claim: _Claim
    task: asyncio.Task[None]
    committing: bool = False
    lease_lost: bool = False


_FETCH = text(
    """
WITH candidates AS (
    SELECT id, lock_key FROM jobs
    WHERE state = 'queued' AND queue = ANY(CAST(:queues AS text[])) AND run_at <= now()
      AND (lock_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM jobs running WHERE running.lock_key = jobs.lock_key
              AND running.state = 'active'))
    ORDER BY priority DESC, run_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT DISTINCT ON (COALESCE(lock_key, id::text)) id FROM candidates
    ORDER BY COALESCE(lock_key, id::text), id
), stamp AS (SELECT clock_timestamp() AS ts)
UPDATE jobs j SET state = 'active', attempts = j.attempts + 1,
    lease_token = nextval('jobs_lease_token_seq'),
    lease_expires_at = stamp.ts + make_interval(secs => :lease),
    worker = :worker, dispatched_at = stamp.ts, started_at = COALESCE(j.started_at, stamp.ts)
FROM chosen, stamp WHERE j.id = chosen.id
RETURNING j.id, j.name, j.queue, j.payload::text, j.attempts, j.max_attempts, j.lease_token,
    j.stalls
"""
)
_ACK = text(
    """
    UPDATE jobs j SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL
    FROM unnest(CAST(:ids AS bigint[]), CAST(:tokens AS bigint[])) AS t(id, token)
    WHERE j.id = t.id AND j.lease_token = t.token AND j.state = 'active'
    RETURNING j.id
    """
)

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

_FAIL_OR_RETRY = text(
    """
    UPDATE jobs SET state = :state, last_error = :error, lease_expires_at = NULL,
        run_at = CASE WHEN :state = 'queued' THEN now() + make_interval(secs => :delay)
                 ELSE run_at END,
        finished_at = CASE WHEN :state = 'failed' THEN now() ELSE NULL END
    WHERE id = :id AND lease_token = :token AND state = 'active'
    RETURNING id
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


def _error_text(error: BaseException) -> str:
    detail = "".join(traceback.format_exception(error))
    head = f"{type(error).__name__}: {error}"
    return (head + "\n" + detail[-3000:])[:4000]


class Worker:
    """Runs jobs from ``config.queues`` in this process. ``await run(stop)`` until ``stop``."""

    def __init__(self, runtime: Runtime, config: WorkerConfig, *, name: str | None = None) -> None:
        self.runtime = runtime
        self.db = runtime.db
        self.config = config
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._running: dict[int, _Running] = {}
        self._acks: list[tuple[_Claim, float]] = []
        self._wake = asyncio.Event()
        self._ack_ready = asyncio.Event()
        self._rng = random.Random()
        self._background: list[asyncio.Task[None]] = []
        self._unlimited = [q for q in config.queues if q not in config.rate_limits]
        self._limited = [q for q in config.queues if q in config.rate_limits]
        self._rate_wait_until: dict[str, float] = {}
        self._batch_min = max(1, config.concurrency // 2)
        # One-statement operations (fetch, ack, heartbeat, retry, stall recovery) run in
        # autocommit: each statement is atomic on its own, and skipping BEGIN/COMMIT saves two
        # of three round trips per call (asyncpg adds no SQL for the autocommit switch).
        self._auto = self.db.primary.execution_options(isolation_level="AUTOCOMMIT")
        self._sessions = async_sessionmaker(
            self.db.primary, expire_on_commit=False, sync_session_class=JobSession
        )
        self._limited_first = False
        self._duration_children: dict[str, Any] = {}
        self.stopping = False

    # ---- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and run jobs until ``stop`` is set, then shut down gracefully."""
        log.info("jobs.worker.started", worker=self.name, queues=list(self.config.queues),
                 concurrency=self.config.concurrency)  # fmt: skip
        for coro, label in (
            (self._listen_forever(), "listen"),
            (self._heartbeat_forever(), "heartbeat"),
            (self._maintain_forever(), "maintenance"),
            (self._flush_acks_forever(), "acks"),
        ):
            self._background.append(asyncio.create_task(coro, name=f"jobs-{label}"))
        stop_waiter = asyncio.create_task(stop.wait())
        stop_waiter.add_done_callback(lambda _: self._wake.set())
        try:
            await self._fetch_loop(stop)
        finally:
            stop_waiter.cancel()
            await self._shutdown()

    async def _fetch_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            # Cleared *before* looking at the state: a NOTIFY or a freed slot arriving while
            # we fetch sets it again and the wait below returns at once (no lost wake-up).
            self._wake.clear()
            free = self.config.concurrency - len(self._running)
            if free <= 0 or (self._running and free < self._batch_min):
                await self._wait(None)
                continue
            try:
                claims, wait_hint = await self._fetch(free)
                failures = 0
            except Exception as error:
                failures += 1
                pause = min(5.0, 0.1 * 2**failures)
                if is_unavailable(error):
                    log.warning("jobs.fetch.db_unavailable", error=str(error)[:200], retry_in=pause)
                else:
                    log.exception("jobs.fetch.failed", retry_in=pause)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
                continue
            for claim in claims:
                self._start(claim)
            if not claims:
                timeout = self.config.poll_interval.total_seconds()
                if wait_hint is not None:
                    timeout = min(timeout, max(0.005, wait_hint))
                await self._wait(timeout)

    async def _wait(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _shutdown(self) -> None:
        self.stopping = True
        grace = self.config.shutdown_grace.total_seconds()
        tasks = [r.task for r in self._running.values()]
        if tasks:
            log.info("jobs.worker.draining", running=len(tasks), grace_s=grace)
            await asyncio.wait(tasks, timeout=grace)
        leftovers = list(self._running.values())
        for running in leftovers:
            running.task.cancel()
        if leftovers:
            await asyncio.gather(*(r.task for r in leftovers), return_exceptions=True)
            pairs = [(r.claim.id, r.claim.token) for r in leftovers if not r.lease_lost]
            try:
                async with self._auto.connect() as conn:
                    released = (await conn.execute(_RELEASE, _pairs(pairs))).scalars().all()
                log.warning("jobs.worker.released", jobs=list(released))
            except Exception:
                log.exception("jobs.worker.release_failed", jobs=[p[0] for p in pairs])
        await self._flush_acks()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        log.info("jobs.worker.stopped", worker=self.name)

    # ---- fetch ----------------------------------------------------------------------------
    async def _fetch(self, want: int) -> tuple[list[_Claim], float | None]:
        """Claim up to ``want`` jobs. Rate-limited and unlimited queues take turns going
        first, so a saturated unlimited queue cannot starve a limited one."""
        claims: list[_Claim] = []
        hints: list[float] = []
        self._limited_first = not self._limited_first
        steps = [self._fetch_unlimited, self._fetch_all_limited]
        if self._limited_first:
            steps.reverse()
        for step in steps:
            if len(claims) < want:
                got, hint = await step(want - len(claims))
                claims += got
                if hint is not None:
                    hints.append(hint)
        return claims, (min(hints) if hints else None)

    async def _fetch_unlimited(self, want: int) -> tuple[list[_Claim], float | None]:
        if not self._unlimited:
            return [], None
        try:
            async with self._auto.connect() as conn:
                return await self._claim(conn, self._unlimited, want), None
        except IntegrityError:
            # Two workers raced for jobs sharing a lock key: the unique index on running
            # lock keys refused this fetch; its jobs stay queued for the next one.
            log.debug("jobs.fetch.lock_key_race")
            return [], 0.01

    async def _fetch_all_limited(self, want: int) -> tuple[list[_Claim], float | None]:
        claims: list[_Claim] = []
        hints: list[float] = []
        now = time.monotonic()
        for queue in self._limited:
            if len(claims) >= want:
                break
            until = self._rate_wait_until.get(queue, 0.0)
            if until > now:
                hints.append(until - now)
                continue
            try:
                got, hint = await self._fetch_limited(queue, want - len(claims))
            except IntegrityError:
                log.debug("jobs.fetch.lock_key_race", queue=queue)
                got, hint = [], 0.01
            claims += got
            if hint is not None:
                self._rate_wait_until[queue] = now + hint
                hints.append(hint)
        return claims, (min(hints) if hints else None)

    async def _claim(self, conn: AsyncConnection, queues: list[str], limit: int) -> list[_Claim]:
        result = await conn.execute(
            _FETCH,
            {"queues": queues, "limit": limit, "worker": self.name,
             "lease": self.config.lease.total_seconds()},
        )  # fmt: skip
        return [_Claim(*row) for row in result.all()]

    async def _fetch_limited(self, queue: str, want: int) -> tuple[list[_Claim], float | None]:
        rule = self.config.rate_limits[queue]
        period = rule.period.total_seconds()
        async with self.db.primary.begin() as conn:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:ns, hashtext(:queue))"),
                {"ns": RATE_LOCK_NAMESPACE, "queue": queue},
            )
            used, oldest, now = (
                await conn.execute(
                    text(
                        "SELECT count(*), min(dispatched_at), clock_timestamp() "
                        "FROM job_dispatches WHERE queue = :queue "
                        "AND dispatched_at > clock_timestamp() - make_interval(secs => :period)"
                    ),
                    {"queue": queue, "period": period},
                )
            ).one()
            allowed = rule.limit - int(used)
            if allowed <= 0:
                wait = (oldest + rule.period - now).total_seconds() if oldest else period
                return [], max(0.005, wait)
            claims = await self._claim(conn, [queue], min(want, allowed))
            if claims:
                await conn.execute(
                    text(
                        "INSERT INTO job_dispatches (queue, dispatched_at) "
                        "SELECT queue, dispatched_at FROM jobs WHERE id = ANY(CAST(:ids AS bigint[]))"
                    ),
                    {"ids": [c.id for c in claims]},
                )
            return claims, None

    # ---- run ------------------------------------------------------------------------------
    def _start(self, claim: _Claim) -> None:
        task = asyncio.create_task(self._run(claim), name=f"job-{claim.id}")
        self._running[claim.id] = _Running(claim, task)
        metrics.RUNNING.labels(claim.queue).inc()
        task.add_done_callback(functools.partial(self._finished, claim))

    def _finished(self, claim: _Claim, _task: asyncio.Task[None] | None = None) -> None:
        self._running.pop(claim.id, None)
        metrics.RUNNING.labels(claim.queue).dec()
        self._wake.set()

    async def _run(self, claim: _Claim) -> None:
        spec = get_spec(claim.name)
        ctx = JobContext(
            id=claim.id, name=claim.name, queue=claim.queue, payload={},
            attempt=claim.attempts, token=claim.token, stalls=claim.stalls,
            runtime=self.runtime, session_factory=self._sessions,
        )  # fmt: skip
        structlog.contextvars.bind_contextvars(job_id=claim.id, job=claim.name)
        started = time.perf_counter()
        try:
            if spec is None:
                raise LookupError(f"no handler registered for job {claim.name!r} in this worker")
            ctx.payload = pydantic_core.from_json(claim.payload)
            timeout = spec.timeout.total_seconds() if spec.timeout else None
            async with asyncio.timeout(timeout):
                await spec.handler(ctx)
            self._duration(claim.queue).observe(time.perf_counter() - started)
            session = ctx.opened_session
            if session is not None and (
                session.in_transaction() or session.new or session.dirty or session.deleted
                or session.info
            ):  # fmt: skip
                await self._complete_in_session(session, claim)
            else:
                if session is not None:
                    await session.close()
                self._acks.append((claim, started))
                self._ack_ready.set()
        except asyncio.CancelledError:
            if ctx.opened_session is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(ctx.opened_session.close())
            raise
        except Exception as error:
            self._duration(claim.queue).observe(time.perf_counter() - started)
            if ctx.opened_session is not None:
                with contextlib.suppress(Exception):
                    await ctx.opened_session.close()
            if isinstance(error, LeaseLost):
                return
            await self._on_error(claim, spec, error)
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "job")

    def _duration(self, queue: str) -> Any:
        child = self._duration_children.get(queue)
        if child is None:
            child = self._duration_children[queue] = metrics.DURATION.labels(queue)
        return child

    async def _complete_in_session(self, session: AsyncSession, claim: _Claim) -> None:
        running = self._running.get(claim.id)
        if running is not None:
            running.committing = True
        try:
            done = (
                await session.execute(_COMPLETE_ONE, {"id": claim.id, "token": claim.token})
            ).first()
            if done is None:
                metrics.LEASE_LOST.labels(claim.queue).inc()
                log.warning("jobs.lease_lost", job_id=claim.id, token=claim.token,
                            at="commit", action="rolled back")  # fmt: skip
                raise LeaseLost(f"job {claim.id}: attempt {claim.token} no longer owns it")
            session.info[_RUNNER_COMMIT] = True
            await session.commit()
        except BaseException:
            await session.rollback()
            await session.close()
            raise
        await session.close()
        metrics.PROCESSED.labels(claim.queue, claim.name).inc()
        await run_on_commit(session)

    async def _on_error(self, claim: _Claim, spec: JobSpec | None, error: Exception) -> None:
        max_attempts = (
            claim.max_attempts or (spec and spec.max_attempts) or self.config.max_attempts
        )
        base = (spec and spec.backoff) or self.config.backoff
        cap = (spec and spec.backoff_max) or self.config.backoff_max
        final = claim.attempts >= max_attempts
        delay = 0.0 if final else backoff_delay(claim.attempts, base, cap, self._rng)
        params = {"id": claim.id, "token": claim.token, "state": "failed" if final else "queued",
                  "delay": delay, "error": _error_text(error)}  # fmt: skip
        for attempt in range(5):
            try:
                async with self._auto.connect() as conn:
                    row = (await conn.execute(_FAIL_OR_RETRY, params)).first()
                break
            except Exception as db_error:
                if attempt == 4 or not is_unavailable(db_error):
                    log.exception("jobs.error_not_recorded", job_id=claim.id)
                    return  # the lease will expire and the job will be retried as stalled
                await asyncio.sleep(0.2 * 2**attempt)
        if row is None:
            metrics.LEASE_LOST.labels(claim.queue).inc()
            log.warning("jobs.lease_lost", job_id=claim.id, at="error")
            return
        if final:
            metrics.FAILED.labels(claim.queue).inc()
            log.error("jobs.failed", job_id=claim.id, job=claim.name, attempts=claim.attempts,
                      error=f"{type(error).__name__}: {error}"[:500])  # fmt: skip
        else:
            metrics.RETRIED.labels(claim.queue).inc()
            log.warning("jobs.retry", job_id=claim.id, job=claim.name, attempt=claim.attempts,
                        delay_s=round(delay, 3), error=f"{type(error).__name__}: {error}"[:500])  # fmt: skip

    # ---- batched acks ---------------------------------------------------------------------
    async def _flush_acks_forever(self) -> None:
        while True:
            await self._ack_ready.wait()
            # Let the acks of jobs finishing together share one round trip.
            await asyncio.sleep(0.002)
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        self._ack_ready.clear()
        if not self._acks:
            return
        batch, self._acks = self._acks, []
        try:
            async with self._auto.connect() as conn:
                done = set(
                    (await conn.execute(_ACK, _pairs((c.id, c.token) for c, _ in batch))).scalars()
                )
        except Exception as error:
            log.warning("jobs.ack_failed", jobs=len(batch), error=str(error)[:200])
            self._acks = batch + self._acks  # retried next round; the lease covers the gap
            await asyncio.sleep(0.5)
            self._ack_ready.set()
            return
        for claim, _ in batch:
            if claim.id in done:
                metrics.PROCESSED.labels(claim.queue, claim.name).inc()
            else:
                metrics.LEASE_LOST.labels(claim.queue).inc()
                log.warning("jobs.lease_lost", job_id=claim.id, token=claim.token, at="ack")

    # ---- heartbeat ------------------------------------------------------------------------
    async def _heartbeat_forever(self) -> None:
        interval = max(0.05, self.config.lease.total_seconds() / 4)
        while True:
            await asyncio.sleep(interval)
            owned = [(r.claim.id, r.claim.token) for r in self._running.values()]
            owned += [(c.id, c.token) for c, _ in self._acks]
            if not owned:
                continue
            try:
                async with self._auto.connect() as conn:
                    renewed = set(
                        (
                            await conn.execute(
                                _HEARTBEAT,
                                {**_pairs(owned), "lease": self.config.lease.total_seconds()},
                            )
                        ).scalars()
                    )
            except Exception as error:
                log.warning("jobs.heartbeat_failed", error=str(error)[:200])
                continue
            for job_id, token in owned:
                running = self._running.get(job_id)
                if job_id in renewed or running is None or running.claim.token != token:
                    continue
                if running.committing or running.task.done():
                    continue
                running.lease_lost = True
                metrics.LEASE_LOST.labels(running.claim.queue).inc()
                log.warning("jobs.lease_lost", job_id=job_id, token=token, at="heartbeat",
                            action="cancelled")  # fmt: skip
                running.task.cancel()

    # ---- LISTEN ---------------------------------------------------------------------------
    async def _listen_forever(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        dsn = make_url(self.runtime.settings.DATABASE_URL).set(drivername="postgresql")
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(dsn.render_as_string(hide_password=False))
                await connection.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake.set())
                while not connection.is_closed():
                    await asyncio.sleep(5)
                    await connection.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.debug("jobs.listen_failed", error=str(error)[:200])
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(connection.close(timeout=1))
            await asyncio.sleep(2)

    # ---- maintenance ----------------------------------------------------------------------
    async def _maintain_forever(self) -> None:
        interval = self.config.stalled_check.total_seconds()
        ticks = 0
        while True:
            await asyncio.sleep(interval * (0.8 + 0.4 * self._rng.random()) if ticks else 0)
            ticks += 1
            for step in (self.recover_stalled, self._schedule_periodic, self._sample_gauges):
                try:
                    await step()
                except Exception as error:
                    log.warning("jobs.maintenance_failed", step=step.__name__,
                                error=str(error)[:200])  # fmt: skip
            if ticks % 20 == 1:
                try:
                    await self._prune()
                except Exception as error:
                    log.warning("jobs.prune_failed", error=str(error)[:200])

    async def recover_stalled(self) -> int:
        """Re-queue (or fail) every job whose lease expired; returns how many."""
        async with self._auto.connect() as conn:
            rows = (await conn.execute(_STALLED, {"max_stalled": self.config.max_stalled})).all()
        for job_id, name, queue, stalls, state, worker in rows:
            metrics.STALLED.labels(queue).inc()
            if state == "failed":
                metrics.FAILED.labels(queue).inc()
            log.warning("jobs.stalled", job_id=job_id, job=name, queue=queue, stalls=stalls,
                        action="failed" if state == "failed" else "requeued",
                        lost_worker=worker)  # fmt: skip
        if rows:
            self._wake.set()
        return len(rows)

    async def _schedule_periodic(self) -> None:
        specs = [s for s in registered().values() if s.cron and s.queue in self.config.queues]
        if not specs:
            return
        now = datetime.now(UTC)
        async with self.db.session() as session:
            for spec in specs:
                first = spec.next_run(now - timedelta(minutes=1))
                await session.execute(
                    text(
                        "INSERT INTO job_schedules (name, next_run_at) VALUES (:name, :at) "
                        "ON CONFLICT (name) DO NOTHING"
                    ),
                    {"name": spec.name, "at": first},
                )
                slot = (
                    await session.execute(
                        text(
                            "SELECT next_run_at FROM job_schedules WHERE name = :name "
                            "AND next_run_at <= now() FOR UPDATE SKIP LOCKED"
                        ),
                        {"name": spec.name},
                    )
                ).scalar_one_or_none()
                if slot is None:
                    continue
                following = spec.next_run(max(slot, now))
                await session.execute(
                    text("UPDATE job_schedules SET next_run_at = :at WHERE name = :name"),
                    {"name": spec.name, "at": following},
                )
                job_id = await enqueue(
                    session, spec.name, {"scheduled_for": slot.isoformat()},
                    dedup_key=f"cron:{spec.name}:{slot.isoformat()}",
                )  # fmt: skip
                log.info("jobs.periodic.enqueued", job=spec.name, slot=slot.isoformat(),
                         job_id=job_id)  # fmt: skip

    async def _sample_gauges(self) -> None:
        async with self.db.session() as session:
            stats = await queue_stats(session)
        seen = {s.queue for s in stats}
        for s in stats:
            metrics.DEPTH.labels(s.queue).set(s.ready)
            metrics.LAG.labels(s.queue).set(s.oldest_age_seconds)
        for queue in set(self.config.queues) - seen:
            metrics.DEPTH.labels(queue).set(0)
            metrics.LAG.labels(queue).set(0)

    async def _prune(self) -> None:
        longest = max((r.period for r in self.config.rate_limits.values()), default=timedelta(0))
        async with self.db.primary.begin() as conn:
            await conn.execute(
                text(
                    "DELETE FROM job_dispatches "
                    "WHERE dispatched_at < now() - make_interval(secs => :secs)"
                ),
                {"secs": max(60.0, 2 * longest.total_seconds())},
            )
            # Failed jobs are never pruned: they wait for a retry or a human.
            await conn.execute(
                text(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs "
                    "WHERE state IN ('succeeded', 'cancelled') "
                    "AND finished_at < now() - make_interval(secs => :secs) LIMIT 10000)"
                ),
                {"secs": self.config.retention.total_seconds()},
            )


# ---- process entry ----------------------------------------------------------------------
async def serve(
    settings: Any,
    *,
    queues: Sequence[str] | None = None,
    concurrency: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run one worker process until SIGTERM/SIGINT (or ``stop``): build the runtime, work,
    drain, close."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    runtime = Runtime(settings, application_name="surge-worker")
    await runtime.start()
    try:
        worker = Worker(runtime, WorkerConfig.from_settings(settings, queues=queues,
                                                            concurrency=concurrency))  # fmt: skip
        runtime.extensions["jobs.worker"] = worker
        await worker.run(stop)
    finally:
        runtime.extensions.pop("jobs.worker", None)
        await runtime.stop()
