"""Console: look-alike e-mail skeletons, the read-only admin role, paused job queues,
service API keys.

Revision ID: 0009_console
Revises: 0008_notifications
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from surge.kit.security.confusables import skeleton

revision: str = "0009_console"
down_revision: str | None = "0008_notifications"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UUID = postgresql.UUID(as_uuid=True)
TS = sa.DateTime(timezone=True)
ROLES_BEFORE = "role IN ('user', 'partner', 'reseller', 'admin')"
ROLES_AFTER = "role IN ('user', 'partner', 'reseller', 'admin', 'admin_readonly')"


def upgrade() -> None:
    # A look-alike (a Cyrillic "а" for a Latin "a") of an existing address is refused by
    # a unique index on its TR39 skeleton (surge.kit.security.confusables).
    op.add_column("users", sa.Column("email_skeleton", sa.Text()))
    bind = op.get_bind()
    seen: set[str] = set()
    for user_id, email in bind.execute(sa.text("SELECT id, email FROM users ORDER BY created_at")):
        key = skeleton(email)
        if key in seen:  # an older look-alike pair keeps working; only the first is indexed
            continue
        seen.add(key)
        bind.execute(
            sa.text("UPDATE users SET email_skeleton = :key WHERE id = :id"),
            {"key": key, "id": user_id},
        )
    op.create_unique_constraint(op.f("uq_users_email_skeleton"), "users", ["email_skeleton"])
    # The console's read-only administrator: sees every view, may not act.
    op.drop_constraint(op.f("ck_users_role"), "users", type_="check")
    op.create_check_constraint(op.f("ck_users_role"), "users", ROLES_AFTER)
    # A paused queue keeps its jobs; workers skip it (surge.kit.jobs.worker's fetch).
    op.create_table(
        "job_queue_pauses",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column(
            "paused_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("paused_by", sa.Text()),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_job_queue_pauses")),
    )
    # Scoped API keys for server-to-server calls (surge.credential); only hashes are stored.
    op.create_table(
        "service_keys",
        sa.Column("id", UUID, nullable=False, server_default=sa.text("gen_random_uuid()")),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("created_by", UUID),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("last_used_at", TS),
        sa.Column("expires_at", TS),
        sa.Column("revoked_at", TS),
        sa.Column("rotated_from", UUID),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_service_keys_prefix")),
    )


def downgrade() -> None:
    op.drop_table("service_keys")
    op.drop_table("job_queue_pauses")
    op.execute("UPDATE users SET role = 'user' WHERE role = 'admin_readonly'")
    op.drop_constraint(op.f("ck_users_role"), "users", type_="check")
    op.create_check_constraint(op.f("ck_users_role"), "users", ROLES_BEFORE)
    op.drop_constraint(op.f("uq_users_email_skeleton"), "users", type_="unique")
    op.drop_column("users", "email_skeleton")
