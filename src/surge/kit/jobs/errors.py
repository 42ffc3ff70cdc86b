"""Errors of ``surge.kit.jobs``.

    SurgeError                          (surge.kit.errors)
    └── JobError                        500: a job-queue problem, not the caller's
        ├── UnknownJob                  enqueue of a name no module registered
        ├── JobNotFound                 404: no job with this id
        ├── JobStateConflict            409: e.g. retry of a job that is not failed
        └── LeaseLost                   the worker no longer owns the job (fenced out)
    Snooze                              raised by a handler: run again later, attempt uncounted

``LeaseLost`` is raised inside the runner when the fenced completion finds another
attempt's token: the handler's writes are rolled back with it.
"""

from __future__ import annotations

from datetime import timedelta

from surge.kit.errors import SurgeError


class JobError(SurgeError):
    status_code = 500
    title = "Job Queue Error"


class UnknownJob(JobError):
    """No ``@job`` registered this name in this process (import the module that defines it)."""


class JobNotFound(JobError):
    status_code = 404
    title = "Not Found"


class JobStateConflict(JobError):
    status_code = 409
    title = "Conflict"


class LeaseLost(JobError):
    """The attempt's lease expired and the job was re-queued or re-run elsewhere."""


class Snooze(Exception):
    """Raised by a handler that must wait for something outside the job (a resource pool
    that is empty for now): the job goes back to the queue to run after ``delay`` and this
    start does not count as an attempt (River's ``JobSnooze``, Oban's ``{:snooze, s}``).

    The handler's writes through ``ctx.session`` are rolled back as on any raise. A job that
    could wait forever must bound its own waiting (e.g. by its payload's creation time):
    snoozes never exhaust ``max_attempts``. Nor do they spend a rate-limited queue's start
    budget (``JOBS_RATE_LIMITS``): the start's place in the window is given back, so a
    snoozing handler also bounds its own start rate through ``delay``."""

    def __init__(self, delay: timedelta, reason: str = "") -> None:
        super().__init__(reason or f"snoozed for {delay.total_seconds():.3f} s")
        self.delay = delay
