"""Suite-wide fixtures: one real PostgreSQL and one real Redis per test session.

By default both are embedded servers started in a temporary folder on random ports (so
several suites can run at once on one machine). ``SURGE_TEST_DATABASE_URL`` and
``SURGE_TEST_REDIS_URL`` point the suite at external servers instead (e.g. the machine's
shared services); tests that stop or kill a server always start their own.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis_async
from fastapi import FastAPI

from surge.config import Settings, normalize_database_url
from surge.kit.db import migrate
from surge.kit.runtime import Runtime
from tests.fixtures.clients import app_client, make_app
from tests.fixtures.servers import start_postgres, start_redis
from tests.fixtures.settings import make_settings

TEST_SECRET = "test-secret-test-secret-test-secret-0123"

# pytest's shared temporary root (/tmp/pytest-of-USER) is chmod 700 by every pytest run that
# starts; as root, the embedded PostgreSQL runs as another user that must traverse it, so a
# second suite starting on the same machine would cut the first one's server off its data.
# Each checkout keeps its temporary folders to itself.
_TEMPROOT = Path(__file__).resolve().parents[1] / ".pytest-tmp"
_TEMPROOT.mkdir(exist_ok=True)
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(_TEMPROOT))


# Re-exported for tests written before the fixtures package: import from tests.fixtures.
__all__ = ["app_client", "make_settings"]


@pytest.fixture(scope="session")
def server_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    started: list[object] = []
    database_url = normalize_database_url(os.environ.get("SURGE_TEST_DATABASE_URL", ""))
    redis_url = os.environ.get("SURGE_TEST_REDIS_URL", "")
    base: Path = tmp_path_factory.mktemp("servers")
    if not database_url:
        pg = start_postgres(base / "postgres")
        started.append(pg)
        database_url = pg.url
    if not redis_url:
        rd = start_redis(base / "redis")
        started.append(rd)
        redis_url = rd.url
    migrate.ensure_database(database_url)  # an external server: created on first use
    migrate.upgrade(database_url)
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    # Every process that runs domain services knows every job, as the app and the worker do
    # at start (enqueue() refuses unknown names); tests get the same, whatever ran first.
    from surge.worker import discover

    discover(make_settings(database_url, redis_url))
    yield database_url, redis_url
    for server in reversed(started):
        server.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def lagging_replica_url(server_urls: tuple[str, str]) -> str:
    """A "replica" that has replayed none of the suite's writes: a second database on the
    suite's server, migrated and empty, so every row a test writes on the primary is missing
    there (as on a streaming replica paused before that write). Routing treats it as a replica
    whose replay position is unknown: it gets every read allowed to be stale."""
    from sqlalchemy.engine import make_url

    url = make_url(server_urls[0]).set(database="surge_lagging_replica")
    rendered = url.render_as_string(hide_password=False)
    migrate.ensure_database(rendered)
    migrate.upgrade(rendered)
    return rendered


@pytest.fixture(scope="session")
def settings(server_urls: tuple[str, str]) -> Settings:
    return make_settings(*server_urls)


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(settings)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


@pytest.fixture
async def redis_client(server_urls: tuple[str, str]) -> AsyncIterator[redis_async.Redis]:
    client = redis_async.Redis.from_url(server_urls[1])
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    """The settings ``app`` is built from; a test package overrides this fixture."""
    return settings


@pytest.fixture
async def app(app_settings: Settings) -> FastAPI:
    return make_app(app_settings)


@pytest.fixture
async def api(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on ``app`` (in-process, lifespan run around it)."""
    async for client in app_client(app):
        yield client


@pytest.fixture
def client(api: httpx.AsyncClient) -> httpx.AsyncClient:
    return api
