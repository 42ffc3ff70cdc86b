"""The slow-query rule of each engine a ``Database`` made (``DB_SLOW_QUERY``): the cursor
events and the fast paths that bypass them (``observe_statement``) both report here."""

from __future__ import annotations

import time
import weakref
from typing import Any

import structlog
from sqlalchemy import Engine

from surge.kit.db.phase import current_phase
from surge.kit.telemetry import metrics

log = structlog.get_logger()


class _SlowLog:
    """One engine's slow-query rule: count, track the maximum and log a statement that took
    ``threshold`` seconds or more (``DB_SLOW_QUERY``)."""

    __slots__ = ("counter", "pool", "threshold")

    def __init__(self, threshold: float, counter: Any, pool: str) -> None:
        self.threshold, self.counter, self.pool = threshold, counter, pool

    def observe(self, statement: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        if elapsed >= self.threshold:
            if (phase := current_phase()) is not None:  # expected (kit.db.phase)
                metrics.DB_EXPECTED_SLOW_QUERIES.labels(self.pool, phase).inc()
                log.info("db.slow_query.expected", pool=self.pool, phase=phase,
                         duration_ms=round(elapsed * 1000, 1))  # fmt: skip
                return
            self.counter.inc()
            metrics.DB_QUERY_MAX.set(elapsed)
            log.warning(
                "db.slow_query", pool=self.pool, duration_ms=round(elapsed * 1000, 1),
                statement=statement[:500],
            )  # fmt: skip


#: The slow-query rule of each engine a ``Database`` made (the fast paths look it up).
_SLOW_LOGS: weakref.WeakKeyDictionary[Engine, _SlowLog] = weakref.WeakKeyDictionary()
