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
from tests.fixtures.servers import start_postgres, start_redis

TEST_SECRET = "test-secret-test-secret-test-secret-0123"

# pytest's shared temporary root (/tmp/pytest-of-USER) is chmod 700 by every pytest run that
# starts; as root, the embedded PostgreSQL runs as another user that must traverse it, so a
# second suite starting on the same machine would cut the first one's server off its data.
# Each checkout keeps its temporary folders to itself.
_TEMPROOT = Path(__file__).resolve().parents[1] / ".pytest-tmp"
_TEMPROOT.mkdir(exist_ok=True)
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(_TEMPROOT))


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


def make_settings(database_url: str, redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "ENV": "test",
        "SECRET_KEY": TEST_SECRET,
        "LOG_JSON": True,
        "LOG_LEVEL": "WARNING",
        # Every test client is "anonymous from 127.0.0.1" on one shared Redis: the default
        # 50 / 15 min would throttle the suite. Rate-limit tests turn it back on.
        "RATELIMIT_ENABLED": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


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


async def app_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client wired to ``app`` in-process, with the lifespan run around it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture
async def app(settings: Settings) -> FastAPI:
    from surge.app import create_app

    return create_app(settings)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for c in app_client(app):
        yield c
