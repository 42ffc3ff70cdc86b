"""Outbox hot updates: the message row's status changes stay HOT (ADR 0046).

Every e-mail updates its outbox row twice on the send path (``queued`` → ``sending`` before
the end of DATA, ``sending`` → ``sent`` after the reply). PostgreSQL can only make an update
HOT (heap-only: no new index entries) when no indexed column changes — and a column named in
a partial index's *predicate* counts as indexed. ``ix_notification_messages_held`` was
``(to_address) WHERE status = 'held'``, so both updates were non-HOT and each wrote a new
entry into every index of the table (the primary key, ``key``, ``created_at``): six index
inserts and their WAL per e-mail, and as many dead entries for vacuum.

- the held index becomes a plain index on ``to_address`` (the address never changes): the
  one query that used it (lifting a suppression re-queues the address's held mail) still
  finds the address's rows through it and filters on the status;
- the table keeps free room in each page (``fillfactor`` 70) so that the new version of a
  row fits beside the old one, which a HOT update needs.

Revision ID: 0017_outbox_hot_updates
Revises: 0016_topup_unspent
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0017_outbox_hot_updates"
down_revision: str | None = "0016_topup_unspent"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DROP INDEX ix_notification_messages_held")
    op.execute(
        "CREATE INDEX ix_notification_messages_address ON notification_messages (to_address)"
    )
    # Applies to pages written from now on; existing pages keep theirs until rewritten.
    op.execute("ALTER TABLE notification_messages SET (fillfactor = 70)")


def downgrade() -> None:
    op.execute("ALTER TABLE notification_messages RESET (fillfactor)")
    op.execute("DROP INDEX ix_notification_messages_address")
    op.execute(
        "CREATE INDEX ix_notification_messages_held ON notification_messages (to_address) "
        "WHERE status = 'held'"
    )
