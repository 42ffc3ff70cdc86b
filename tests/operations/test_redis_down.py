"""Seed 000 "stop Redis → degradation": with the session cache's Redis stopped, operations
still run (a login each), and nothing is charged twice; a Redis this test started itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from surge.kit.embedded import EmbeddedRedis
from tests.fixtures.clients import app_client, runtime_of
from tests.fixtures.provider import ACCOUNTS, control, egress_proxies, provider_server
from tests.fixtures.servers import start_redis
from tests.operations.conftest import (
    make_reseller,
    ops_settings,
    ops_worker,
    register_fleet,
    reset,
    submit,
    wait_decided,
)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    server = start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.chaos
async def test_operations_run_without_the_session_cache(
    server_urls: tuple[str, str], own_redis: EmbeddedRedis
) -> None:
    from surge.app import create_app

    async with provider_server() as provider, egress_proxies(2) as proxies:
        app: FastAPI = create_app(ops_settings(server_urls[0], own_redis.url, provider.url))
        api: httpx.AsyncClient
        async for api in app_client(app):
            runtime = runtime_of(app)
            await reset(runtime)
            # One account, two proxies: with a cache 4 operations would need 2 logins.
            await register_fleet(runtime, proxies, {"agent1": ACCOUNTS["agent1"]})
            caller = await make_reseller(app, api)
            own_redis.stop()  # the session cache is gone
            async with ops_worker(runtime, concurrency=1):
                ids = [
                    (await submit(api, caller, card=f"50000000{i:02d}")).json()["id"]
                    for i in range(4)
                ]
                done = [await wait_decided(api, caller, i) for i in ids]
            assert [d["status"] for d in done] == ["succeeded"] * 4
            state = await control(provider.url, "/_control/state")
            assert state["logins"] == 4  # no cache: one login per operation
            assert sorted(p["reference"] for p in state["performed"]) == sorted(ids)
