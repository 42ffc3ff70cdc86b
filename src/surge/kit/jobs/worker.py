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
  batches (the ``UPDATE`` is fenced the same way; ``surge.kit.jobs.acks``).
- **heartbeat**: every lease/4 the process renews the leases of the attempts it owns; an
  attempt whose renewal finds another token is cancelled at once (``jobs.lease_lost``).
- **maintenance** every ``JOBS_STALLED_CHECK``: expired leases are ``stalled`` (logged,
  counted, re-queued; failed once a job stalled more than ``max_stalled`` times — BullMQ's
  ``maxStalledCount`` rule), periodic jobs whose slot came are enqueued (one worker wins
  each slot), the dispatch log and old finished jobs are pruned, depth/lag gauges refreshed.
- **shutdown** (SIGTERM/SIGINT): stop fetching, let running jobs finish for
  ``JOBS_SHUTDOWN_GRACE``, cancel the rest and put them back (not counted as attempts),
  send the last batched acks (the batch in flight included: ``surge.kit.jobs.acks``).
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydantic_core
import structlog
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from surge.kit.backoff import delay as retry_delay
from surge.kit.db import is_unavailable, observe_statement, run_on_commit
from surge.kit.jobs import _driver, metrics
from surge.kit.jobs._sql import (
    _COMPLETE_ONE,
    _FAIL_OR_RETRY,
    _HEARTBEAT,
    _RELEASE,
    FETCH,
    RATE_LOCK_NAMESPACE,
    _pairs,
)
from surge.kit.jobs.acks import AckBatcher
from surge.kit.jobs.config import RateLimit, WorkerConfig
from surge.kit.jobs.context import JobContext
from surge.kit.jobs.errors import LeaseLost, Snooze
from surge.kit.jobs.maintenance import Maintenance
from surge.kit.jobs.registry import JobSpec, get_spec
from surge.kit.jobs.schema import NOTIFY_CHANNEL
from surge.kit.runtime import Runtime

log = structlog.get_logger()

__all__ = ["JobSession", "RateLimit", "Worker", "WorkerConfig", "serve"]

_RUNNER_COMMIT = "surge_jobs_runner_commit"


def _error_text(error: BaseException) -> str:
    detail = "".join(traceback.format_exception(error))
    head = f"{type(error).__name__}: {error}"
    return (head + "\n" + detail[-3000:])[:4000]


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


class Worker:
    """Runs jobs from ``config.queues`` in this process. ``await run(stop)`` until ``stop``."""

    def __init__(self, runtime: Runtime, config: WorkerConfig, *, name: str | None = None) -> None:
        self.runtime = runtime
        self.db = runtime.db
        self.config = config
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._running: dict[int, _Running] = {}
        self._acks = AckBatcher[_Claim](self.db.primary, lambda c: self._processed(c).inc())
        self._wake = asyncio.Event()
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
        # Metric children by label values: ``labels()`` is a lock and a dict lookup per call.
        self._duration_children: dict[str, Any] = {}
        self._running_children: dict[str, Any] = {}
        self._processed_children: dict[tuple[str, str], Any] = {}
        self.stopping = False
        self._maintenance = Maintenance(self.db, self._auto, config, self._wake, self._rng)

    # ---- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and run jobs until ``stop`` is set, then shut down gracefully."""
        log.info("jobs.worker.started", worker=self.name, queues=list(self.config.queues),
                 concurrency=self.config.concurrency)  # fmt: skip
        for coro, label in (
            (self._listen_forever(), "listen"),
            (self._heartbeat_forever(), "heartbeat"),
            (self._maintenance.run_forever(), "maintenance"),
            (self._acks.run_forever(), "acks"),
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
        await self._acks.flush_last(within=self.config.lease.total_seconds())
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
            rows = await _driver.pooled(
                self.db.primary, FETCH, self._fetch_args(self._unlimited, want), rows=True
            )
            return [_Claim(*row) for row in rows], None
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

    def _fetch_args(self, queues: list[str], limit: int) -> tuple[Any, ...]:
        return (queues, limit, self.name, self.config.lease.total_seconds())

    async def _claim(self, conn: AsyncConnection, queues: list[str], limit: int) -> list[_Claim]:
        """``FETCH`` inside ``conn``'s open transaction (the rate-limited path)."""
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        args = self._fetch_args(queues, limit)
        started = time.perf_counter()
        try:
            rows = await driver.fetch(FETCH, *args)
        except Exception as error:
            raise _driver.as_dbapi_error(conn.dialect, FETCH, args, error) from error
        finally:
            observe_statement(conn.sync_engine, FETCH, started)
        return [_Claim(*row) for row in rows]

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
        self._gauge(claim.queue).inc()
        task.add_done_callback(functools.partial(self._finished, claim))

    def _finished(self, claim: _Claim, _task: asyncio.Task[None] | None = None) -> None:
        self._running.pop(claim.id, None)
        self._gauge(claim.queue).dec()
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
                self._acks.add(claim)
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

    def _gauge(self, queue: str) -> Any:
        child = self._running_children.get(queue)
        if child is None:
            child = self._running_children[queue] = metrics.RUNNING.labels(queue)
        return child

    def _processed(self, claim: _Claim) -> Any:
        key = (claim.queue, claim.name)
        child = self._processed_children.get(key)
        if child is None:
            child = self._processed_children[key] = metrics.PROCESSED.labels(*key)
        return child

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
        self._processed(claim).inc()
        await run_on_commit(session)

    async def _on_error(self, claim: _Claim, spec: JobSpec | None, error: Exception) -> None:
        max_attempts = (
            claim.max_attempts or (spec and spec.max_attempts) or self.config.max_attempts
        )
        base = (spec and spec.backoff) or self.config.backoff
        cap = (spec and spec.backoff_max) or self.config.backoff_max
        snoozed = isinstance(error, Snooze)
        final = not snoozed and claim.attempts >= max_attempts
        if isinstance(error, Snooze):
            delay = max(0.0, error.delay.total_seconds())
        else:
            delay = 0.0 if final else retry_delay(claim.attempts, base, cap, rng=self._rng)
        params = {"id": claim.id, "token": claim.token, "state": "failed" if final else "queued",
                  "delay": delay, "uncount": int(snoozed),
                  "error": f"Snooze: {error}"[:4000] if snoozed else _error_text(error)}  # fmt: skip
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
        if snoozed:
            # Its place in the rate-limit window was given back (``_FAIL_OR_RETRY``): this
            # worker asks again instead of sleeping out the wait its last full window set.
            self._rate_wait_until.pop(claim.queue, None)
            metrics.SNOOZED.labels(claim.queue).inc()
            log.info("jobs.snoozed", job_id=claim.id, job=claim.name, delay_s=round(delay, 3),
                     reason=str(error)[:500])  # fmt: skip
        elif final:
            metrics.FAILED.labels(claim.queue).inc()
            log.error("jobs.failed", job_id=claim.id, job=claim.name, attempts=claim.attempts,
                      error=f"{type(error).__name__}: {error}"[:500])  # fmt: skip
        else:
            metrics.RETRIED.labels(claim.queue).inc()
            log.warning("jobs.retry", job_id=claim.id, job=claim.name, attempt=claim.attempts,
                        delay_s=round(delay, 3), error=f"{type(error).__name__}: {error}"[:500])  # fmt: skip

    # ---- heartbeat ------------------------------------------------------------------------
    async def _heartbeat_forever(self) -> None:
        interval = max(0.05, self.config.lease.total_seconds() / 4)
        while True:
            await asyncio.sleep(interval)
            owned = [(r.claim.id, r.claim.token) for r in self._running.values()]
            owned += [(c.id, c.token) for c in self._acks.waiting]
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
    # ---- maintenance (surge.kit.jobs.maintenance) -----------------------------------------
    async def recover_stalled(self) -> int:
        """Re-queue (or fail) every job whose lease expired; returns how many."""
        return await self._maintenance.recover_stalled()


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
