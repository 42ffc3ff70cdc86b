"""The ORM models and the migrations describe the same schema: ``alembic revision
--autogenerate`` on a migrated database proposes no change (issue 12: it proposed dropping
the wallet tables because ``surge.models`` did not import them)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import pool
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from surge.kit.db import migrate
from surge.models import Base
from surge.models.registry import include_object

MODELS = Path(__file__).resolve().parents[1] / "src" / "surge" / "models"


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_object": include_object}
    )
    return list(compare_metadata(context, Base.metadata))


@contextlib.contextmanager
def scratch_database(server_urls: tuple[str, str], prefix: str) -> Iterator[str]:
    """A database of the test's own on the test server (other tests add tables of theirs to
    the shared one), created empty and dropped afterwards: its URL."""
    url = make_url(server_urls[0]).set(database=f"{prefix}_{uuid.uuid4().hex[:8]}")

    async def drop() -> None:
        admin = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        async with admin.connect() as connection:
            await connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}"')
        await admin.dispose()

    fresh = url.render_as_string(hide_password=False)
    try:
        assert migrate.ensure_database(fresh)
        yield fresh
    finally:
        asyncio.run(drop())


def test_autogenerate_on_a_migrated_database_proposes_nothing(
    server_urls: tuple[str, str],
) -> None:
    """On a database of its own (other tests add tables of theirs to the shared one),
    migrated from empty like ``surge migrate`` does it, dropped afterwards."""

    async def compare(fresh: str) -> list[Any]:
        engine = create_async_engine(fresh, poolclass=pool.NullPool)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(_diff)
        finally:
            await engine.dispose()

    with scratch_database(server_urls, "surge_drift") as fresh:
        migrate.upgrade(fresh)
        diff = asyncio.run(compare(fresh))
    assert diff == [], "autogenerate would propose:\n" + "\n".join(map(str, diff))


def test_importing_the_registry_imports_every_model_module() -> None:
    """What Alembic's env.py imports (``surge.models``) alone must load every model module:
    checked in a fresh interpreter, where nothing else imported them first."""
    modules = sorted(
        p.stem for p in MODELS.glob("*.py") if p.stem not in {"__init__", "base", "registry"}
    )
    code = (
        "import sys, surge.models\n"
        f"missing = [m for m in {modules!r} if 'surge.models.' + m not in sys.modules]\n"
        "print(','.join(missing))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", f"not imported by surge.models: {result.stdout}"


def test_a_failing_migration_reports_its_own_error_and_releases_the_lock(
    server_urls: tuple[str, str], tmp_path: Path
) -> None:
    """A revision that fails leaves its transaction aborted; the migrator's unlock must not
    run inside it and replace the real error with "current transaction is aborted"."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    copy = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, copy)
    head = ScriptDirectory(str(migrate.MIGRATIONS_DIR)).get_current_head()
    (copy / "versions" / "9999_broken.py").write_text(
        f'revision = "9999_broken"\ndown_revision = "{head}"\n'
        "from alembic import op\n\n\n"
        'def upgrade() -> None:\n    op.execute("SELECT 1 / 0")\n'
    )

    async def lock_is_free(fresh: str) -> bool:
        engine = create_async_engine(fresh, poolclass=pool.NullPool)
        try:
            async with engine.connect() as connection:
                taken = await connection.scalar(
                    text("SELECT pg_try_advisory_lock(:k)"), {"k": 7_421_001}
                )
                await connection.execute(text("SELECT pg_advisory_unlock_all()"))
                return bool(taken)
        finally:
            await engine.dispose()

    with scratch_database(server_urls, "surge_broken") as fresh:
        config = migrate.alembic_config(fresh)
        config.set_main_option("script_location", str(copy))
        with pytest.raises(Exception, match="division by zero") as raised:
            command.upgrade(config, "heads")
        assert "current transaction is aborted" not in str(raised.value)
        assert asyncio.run(lock_is_free(fresh))
