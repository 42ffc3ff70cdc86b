"""Jobs hot paths: the dedup and lock-key unique indexes hold only jobs that have a key.

Both were partial on the state alone, so every job entered them with a NULL key: one index
insert at enqueue (``uq_jobs_dedup_key``, queued) and two more at every claim (both,
active) — index entries that can never conflict, since NULLs are distinct. Keyed jobs keep
exactly the same uniqueness; a job without a key now costs two index inserts less per
attempt (ADR 0025). ``ON CONFLICT (dedup_key) WHERE state IN (...) AND dedup_key IS NOT NULL``
infers the new index (and the old one, whose predicate it implies), so the code runs on
either side of this migration.

Revision ID: 0012_jobs_hot_paths
Revises: 0011_notifications2
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012_jobs_hot_paths"
down_revision: str | None = "0011_notifications2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DROP INDEX uq_jobs_dedup_key")
    op.execute(
        "CREATE UNIQUE INDEX uq_jobs_dedup_key ON jobs (dedup_key) "
        "WHERE state IN ('queued', 'active') AND dedup_key IS NOT NULL"
    )
    op.execute("DROP INDEX uq_jobs_lock_key")
    op.execute(
        "CREATE UNIQUE INDEX uq_jobs_lock_key ON jobs (lock_key) "
        "WHERE state = 'active' AND lock_key IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX uq_jobs_lock_key")
    op.execute("CREATE UNIQUE INDEX uq_jobs_lock_key ON jobs (lock_key) WHERE state = 'active'")
    op.execute("DROP INDEX uq_jobs_dedup_key")
    op.execute(
        "CREATE UNIQUE INDEX uq_jobs_dedup_key ON jobs (dedup_key) "
        "WHERE state IN ('queued', 'active')"
    )
