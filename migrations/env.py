"""Alembic environment: async engine, every model's metadata, one migrator at a time.

A PostgreSQL advisory lock serialises concurrent ``surge migrate`` runs (several processes
starting at once must not race on the same DDL).
"""

from __future__ import annotations

import asyncio
import contextlib

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from surge.config import settings
from surge.models import Base
from surge.models.registry import include_object

MIGRATION_LOCK_ID = 7_421_001  # arbitrary, constant: pg_advisory_lock key for migrations

target_metadata = Base.metadata


def _url() -> str:
    return context.config.get_main_option("sqlalchemy.url") or settings.DATABASE_URL


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
    done = False
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            include_object=include_object,
        )
        with context.begin_transaction():
            context.run_migrations()
        done = True
    finally:
        # A failed revision leaves the transaction aborted: end it first (the advisory lock
        # is the session's, it outlives the rollback), so that the unlock can run, and let
        # the revision's own error be the one reported, not the unlock's.
        if not done:
            with contextlib.suppress(Exception):
                connection.rollback()
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
            connection.commit()
        except Exception:
            if done:
                raise
            # The connection is closed next; closing it releases the lock too.


async def run_migrations_online() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
