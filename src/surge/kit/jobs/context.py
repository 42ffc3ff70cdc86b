"""What a job handler receives: its payload, its attempt, and one unit-of-work session."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

if TYPE_CHECKING:
    from surge.kit.runtime import Runtime


@dataclass
class JobContext:
    """One attempt of one job.

    ``session`` is the job's unit of work: flush, never commit. The runner commits it
    together with the job's completion, fenced by ``token``: if this attempt's lease was
    lost (the worker paused past it and another worker took the job), the commit is
    refused and every write made through ``session`` is rolled back. The session is
    created on first use, so a job that never touches the database costs no transaction of
    its own (its completion is acked in a batch).
    """

    id: int
    name: str
    queue: str
    payload: dict[str, Any]
    attempt: int
    """1 for the first run; every start (including one that stalled) counts."""
    token: int
    """The fencing token of this attempt (strictly increasing across attempts)."""
    stalls: int
    runtime: Runtime
    session_factory: Callable[[], AsyncSession] = field(repr=False)
    _session: AsyncSession | None = field(default=None, init=False, repr=False)
    _log: Any = field(default=None, init=False, repr=False)

    @property
    def session(self) -> AsyncSession:
        """The job's unit of work (created on first access)."""
        if self._session is None:
            self._session = self.session_factory()
        return self._session

    @property
    def opened_session(self) -> AsyncSession | None:
        """The session if the handler asked for it (the runner's view)."""
        return self._session

    @property
    def log(self) -> Any:
        """A structlog logger bound to this job's id and name."""
        if self._log is None:
            self._log = structlog.get_logger().bind(job_id=self.id, job=self.name)
        return self._log
