"""Errors of ``surge.kit.jobs``.

    SurgeError                          (surge.kit.errors)
    └── JobError                        500: a job-queue problem, not the caller's
        ├── UnknownJob                  enqueue of a name no module registered
        ├── JobNotFound                 404: no job with this id
        ├── JobStateConflict            409: e.g. retry of a job that is not failed
        └── LeaseLost                   the worker no longer owns the job (fenced out)

``LeaseLost`` is raised inside the runner when the fenced completion finds another
attempt's token: the handler's writes are rolled back with it.
"""

from __future__ import annotations

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
