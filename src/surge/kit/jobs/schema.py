"""The jobs tables, as SQLAlchemy Core, attachable to any ``MetaData``.

The kit must not import ``surge.models``; ``define_tables(metadata)`` lets the application's
model package attach these tables to its own ``MetaData`` so Alembic's autogenerate sees
them, while the migration (``migrations/versions/2026-11-22_jobs.py``) is written by hand
with the partial indexes, the token sequence and the NOTIFY trigger spelled out.

``jobs``            one row per job, kept after it finishes (status by id, failures retained).
``job_dispatches``  the sliding log behind the global per-queue rate limit.
``job_schedules``   one row per periodic job: the next slot, claimed by exactly one worker.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

STATES = ("queued", "active", "succeeded", "failed", "cancelled")
NOTIFY_CHANNEL = "surge_jobs"
TOKEN_SEQUENCE = "jobs_lease_token_seq"


def define_tables(metadata: MetaData) -> dict[str, Table]:
    """Attach ``jobs``, ``job_dispatches``, ``job_schedules`` and ``job_queue_pauses`` to
    ``metadata`` (idempotent)."""
    if "jobs" in metadata.tables:
        names = ("jobs", "job_dispatches", "job_schedules", "job_queue_pauses")
        return {name: metadata.tables[name] for name in names}
    states = ", ".join(f"'{s}'" for s in STATES)
    jobs = Table(
        "jobs",
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("queue", Text, nullable=False),
        Column("name", Text, nullable=False),
        Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("state", Text, nullable=False, server_default=text("'queued'")),
        Column("priority", SmallInteger, nullable=False, server_default=text("0")),
        Column("run_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("max_attempts", Integer, nullable=True),
        Column("stalls", Integer, nullable=False, server_default=text("0")),
        Column("max_stalled", Integer, nullable=True),
        Column("dedup_key", Text, nullable=True),
        Column("lock_key", Text, nullable=True),
        Column("lease_token", BigInteger, nullable=True),
        Column("lease_expires_at", DateTime(timezone=True), nullable=True),
        Column("worker", Text, nullable=True),
        Column("last_error", Text, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("started_at", DateTime(timezone=True), nullable=True),
        Column("dispatched_at", DateTime(timezone=True), nullable=True),
        Column("finished_at", DateTime(timezone=True), nullable=True),
        CheckConstraint(f"state IN ({states})", name="state"),
        Index(
            "ix_jobs_fetch",
            "queue",
            text("priority DESC"),
            "run_at",
            "id",
            postgresql_where=text("state = 'queued'"),
        ),
        Index(
            "uq_jobs_dedup_key",
            "dedup_key",
            unique=True,
            # Only keyed jobs: a NULL key never conflicts (ADR 0025, two index inserts less).
            postgresql_where=text("state IN ('queued', 'active') AND dedup_key IS NOT NULL"),
        ),
        Index(
            "uq_jobs_lock_key",
            "lock_key",
            unique=True,
            postgresql_where=text("state = 'active' AND lock_key IS NOT NULL"),
        ),
        Index("ix_jobs_lease", "lease_expires_at", postgresql_where=text("state = 'active'")),
        Index(
            "ix_jobs_finished",
            "state",
            "finished_at",
            postgresql_where=text("state IN ('succeeded', 'failed', 'cancelled')"),
        ),
    )
    dispatches = Table(
        "job_dispatches",
        metadata,
        Column("queue", Text, nullable=False),
        Column("dispatched_at", DateTime(timezone=True), nullable=False),
        Index("ix_job_dispatches_queue_at", "queue", "dispatched_at"),
    )
    schedules = Table(
        "job_schedules",
        metadata,
        Column("name", Text, primary_key=True),
        Column("next_run_at", DateTime(timezone=True), nullable=False),
    )
    # A paused queue keeps its jobs; workers skip it until it is resumed (the console).
    pauses = Table(
        "job_queue_pauses",
        metadata,
        Column("queue", Text, primary_key=True),
        Column("paused_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("paused_by", Text),
    )
    return {
        "jobs": jobs,
        "job_dispatches": dispatches,
        "job_schedules": schedules,
        "job_queue_pauses": pauses,
    }
