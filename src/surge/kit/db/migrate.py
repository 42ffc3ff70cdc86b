"""Apply Alembic migrations from code (``surge migrate``, ``surge up``, the test fixtures)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import create_async_engine

#: ``migrations/`` at the project root (src layout: src/surge/kit/db/migrate.py → 4 parents up).
MIGRATIONS_DIR = Path(__file__).resolve().parents[4] / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def ensure_database(url: str) -> bool:
    """Create the database ``url`` names if the server does not have it (a fresh external
    server on a developer's machine). Returns True when it was created. Needs a role that
    may create databases; connection errors other than "no such database" propagate."""
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    target = make_url(url)

    async def run() -> bool:
        engine = create_async_engine(url)
        try:
            async with engine.connect():
                return False
        except Exception as error:
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, asyncpg.InvalidCatalogNameError):
                cause = cause.__cause__
            if cause is None:
                raise
        finally:
            await engine.dispose()
        admin = create_async_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            async with admin.connect() as connection:
                name = (target.database or "").replace('"', '""')
                await connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            await admin.dispose()
        return True

    return asyncio.run(run())


def pending_revisions(url: str) -> list[str]:
    """Revisions not yet applied, oldest first."""
    script = ScriptDirectory.from_config(alembic_config(url))

    async def current() -> tuple[str, ...]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(
                    lambda sync: MigrationContext.configure(sync).get_current_heads()
                )
        finally:
            await engine.dispose()

    heads = asyncio.run(current())
    pending = [
        rev.revision
        for rev in script.iterate_revisions("heads", heads[0] if heads else "base")
        if rev.revision not in heads
    ]
    return list(reversed(pending))


def upgrade(url: str, on_step: Callable[[str], None] | None = None) -> None:
    """Apply every pending revision; ``on_step(revision)`` after each (progress bars)."""
    config = alembic_config(url)
    revisions = pending_revisions(url)
    if on_step is None:
        command.upgrade(config, "heads")
        return
    for revision in revisions:
        command.upgrade(config, revision)
        on_step(revision)
