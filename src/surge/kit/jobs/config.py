"""How a worker process runs: ``WorkerConfig`` (from the ``JOBS_*`` settings), per-queue
``RateLimit`` and the retry backoff."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from surge.kit.jobs.registry import registered


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
