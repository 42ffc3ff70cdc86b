"""Migration 0009_console and the models agree on the console's tables (Alembic
autogenerate finds nothing to change in them)."""

from __future__ import annotations

from surge.kit.runtime import Runtime

OURS = {"service_keys", "job_queue_pauses"}


async def test_migration_matches_the_models(runtime: Runtime) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import MetaData

    from surge.models import Base

    def diff(sync_conn: object, metadata: MetaData) -> list[object]:
        context = MigrationContext.configure(sync_conn, opts={"compare_type": True})  # type: ignore[arg-type]
        return list(compare_metadata(context, metadata))

    async with runtime.db.primary.connect() as conn:
        changes = await conn.run_sync(diff, Base.metadata)
        against_nothing = await conn.run_sync(diff, MetaData())
    dropped = {
        c[1].name for c in against_nothing if isinstance(c, tuple) and c[0] == "remove_table"
    }
    assert dropped >= OURS

    def about_ours(change: object) -> bool:
        text_ = repr(change)
        return any(f"'{name}'" in text_ or f"table={name}" in text_ for name in OURS) or (
            "email_skeleton" in text_
        )

    assert [c for c in changes if about_ours(c)] == []
