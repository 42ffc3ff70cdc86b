"""Redis and PostgreSQL both down: signed-in callers get 503 with Retry-After, not 429
(issue 20). Before, the rate-limit hook could not check the session, called the caller
anonymous, and every user behind one address shared the anonymous budget's local share
(50 / 15 min over 2 processes: one request every 36 s), so after a few requests everyone
was told 429 with ``Retry-After: 35`` for what was an outage."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from surge.kit.db import migrate
from surge.kit.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.fixtures.clients import app_client
from tests.fixtures.servers import start_postgres, start_redis
from tests.fixtures.settings import make_settings

PASSWORD = "correct horse battery staple"


async def _signed_in(api: httpx.AsyncClient) -> dict[str, str]:
    email = f"outage-{uuid.uuid4().hex[:12]}@example.com"
    body = {"email": email, "password": PASSWORD}
    # 202: the same answer for every address (issue 16)
    assert (await api.post("/api/v1/auth/register", json=body)).status_code == 202
    response = await api.post("/api/v1/auth/login", json=body)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, EmbeddedRedis]]:
    pg = start_postgres(tmp_path / "pg")
    redis = start_redis(tmp_path / "redis")
    migrate.upgrade(pg.url)
    yield pg, redis
    redis.stop()
    pg.stop("immediate")


async def test_both_down_is_503_for_signed_in_users_not_429(
    servers: tuple[EmbeddedPostgres, EmbeddedRedis],
) -> None:
    from surge.app import create_app

    pg, redis = servers
    settings = make_settings(
        pg.url,
        redis.url,
        AUTH_ARGON2_TIME_COST=1,
        AUTH_ARGON2_MEMORY_KIB=1024,
        AUTH_ARGON2_PARALLELISM=1,
        DB_CONNECT_TIMEOUT=1,
        RATELIMIT_ENABLED=True,  # the defaults of seeds 003/004, as in production
        RATELIMIT_LOCAL_PROCESSES=2,
    )
    app = create_app(settings)
    async for api in app_client(app):
        users = [await _signed_in(api) for _ in range(3)]
        for tokens in users:
            assert (await api.get("/api/v1/me/privileges", headers=tokens)).status_code == 200

        await asyncio.to_thread(redis.kill)
        await asyncio.to_thread(pg.kill)

        seen: Counter[int] = Counter()
        retry_after: set[str] = set()
        for _ in range(40):  # more than the anonymous share (25) from one address
            for tokens in users:
                for path in ("/api/v1/me/privileges", "/api/v1/wallet"):
                    response = await api.get(path, headers=tokens)
                    seen[response.status_code] += 1
                    if response.status_code == 503:
                        assert response.headers["content-type"] == "application/problem+json"
                        retry_after.add(response.headers["retry-after"])
        assert 429 not in seen, seen
        assert 500 not in seen, seen
        assert seen[503] > 0, seen
        assert set(seen) <= {503, 200}, seen  # 200: privileges answered from memory
        assert retry_after
        assert all(int(v) <= 5 for v in retry_after), retry_after

        # A forged token is still anonymous: the anonymous budget still applies to it.
        forged = {"Authorization": "Bearer not-a-token"}
        statuses = Counter(
            [
                (await api.get("/api/v1/me/privileges", headers=forged)).status_code
                for _ in range(30)
            ]
        )
        assert statuses[429] > 0, statuses
