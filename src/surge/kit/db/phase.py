"""Expected-slow phases: work known to run long statements labels itself.

A process's start-up reads in bulk (caches warmed before it takes traffic): on a busy
machine such a statement can pass ``DB_SLOW_QUERY`` and fire the slow-query alert at every
start, which teaches operators to ignore it. The threshold stays as it is for everything
else; the start-up work says what it is instead::

    with expected_slow("startup.warm"):
        await warm_caches()

A statement past the threshold inside the phase is counted in
``db_expected_slow_queries_total{pool, phase}`` and logged at info level, not in
``db_slow_queries_total`` / ``db_query_max_seconds`` (what the alert reads). The phase ends
with its block: a task started inside it that outlives it (a background loop) inherits the
context but not the exemption.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class _Phase:
    __slots__ = ("name", "open")

    def __init__(self, name: str) -> None:
        self.name, self.open = name, True


_PHASE: ContextVar[_Phase | None] = ContextVar("surge_db_expected_slow", default=None)


@contextmanager
def expected_slow(name: str) -> Iterator[None]:
    """Label the statements run inside the block as an expected-slow phase ``name``."""
    phase = _Phase(name)
    token = _PHASE.set(phase)
    try:
        yield
    finally:
        phase.open = False
        _PHASE.reset(token)


def current_phase() -> str | None:
    """The expected-slow phase the caller runs in, if one is open."""
    phase = _PHASE.get()
    return phase.name if phase is not None and phase.open else None
