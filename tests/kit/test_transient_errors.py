"""Transient failures found by ``make chaos`` (issue 20) answer 503 + Retry-After, not 500:
a statement cancelled by ``statement_timeout`` (+50 ms to PostgreSQL made a hot row's lock
queue exceed it), and redis-py writing to a connection the peer reset under uvloop (a
``RuntimeError``, not a ``ConnectionError``)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from surge.app import create_app
from surge.kit.redis import RedisGateway, RedisUnavailable, is_closed_transport
from surge.kit.web.deps import SessionDep
from tests.fixtures.clients import app_client
from tests.fixtures.settings import make_settings

CLOSED = (
    "unable to perform operation on <TCPTransport closed=True reading=False 0x55>; "
    "the handler is closed"
)


async def test_statement_timeout_is_503_with_retry_after(server_urls: tuple[str, str]) -> None:
    app = create_app(make_settings(*server_urls, DB_STATEMENT_TIMEOUT=0.2))

    @app.get("/t/slow")
    async def slow(session: SessionDep) -> dict[str, bool]:
        await session.execute(text("SELECT pg_sleep(2)"))
        return {"ok": True}

    async for client in app_client(app):
        response = await client.get("/t/slow")
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "2"
        assert response.json()["type"].endswith("/busy")


async def test_closed_transport_is_redis_unavailable(server_urls: tuple[str, str]) -> None:
    gateway = RedisGateway(server_urls[1], backoff_step=0.05, backoff_max=0.2)
    try:
        assert await gateway.ping()
        with pytest.raises(RedisUnavailable):
            async with gateway.guard():
                raise RuntimeError(CLOSED)
        assert not gateway.is_up
        assert is_closed_transport(RuntimeError(CLOSED))
        assert not is_closed_transport(RuntimeError("something else"))
        assert not is_closed_transport(ValueError(CLOSED))
    finally:
        await gateway.close()


async def test_other_runtime_errors_are_not_swallowed(server_urls: tuple[str, str]) -> None:
    gateway = RedisGateway(server_urls[1])
    try:
        with pytest.raises(RuntimeError, match="a bug"):
            async with gateway.guard():
                raise RuntimeError("a bug")
        assert gateway.is_up
    finally:
        await gateway.close()


async def test_cache_read_on_a_reset_connection_is_a_miss(server_urls: tuple[str, str]) -> None:
    """The cache's lean L2 read (no guard) sees the same uvloop error: a miss, Redis down."""
    from surge.kit.cache import Cache

    gateway = RedisGateway(server_urls[1], backoff_step=0.05, backoff_max=0.2)
    cache = Cache(gateway, namespace="t-closed")
    try:
        assert await gateway.ping()

        async def closed(*_: object) -> None:
            raise RuntimeError(CLOSED)

        gateway.raw.get = closed  # type: ignore[method-assign,assignment]
        assert await cache._l2_get("k") is None
        assert not gateway.is_up
    finally:
        await gateway.close()
