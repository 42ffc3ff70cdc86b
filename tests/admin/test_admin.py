"""The admin console API: fleet metrics and cache clearing, behind admin + MFA; the page."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from tests.fixtures.factories import bearer, login, make_admin, register


async def test_metrics_need_an_admin_with_mfa(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/admin/metrics")).status_code == 401
    email, _ = await register(api)
    user = await login(api, email)
    refused = await api.get("/api/admin/metrics", headers=bearer(user))
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"


async def test_metrics_show_the_fleet(id_app: FastAPI, api: httpx.AsyncClient) -> None:
    _, tokens, _ = await make_admin(id_app, api)
    for _ in range(5):
        await api.get("/livez")
    assert (await api.get("/definitely/missing")).status_code == 404
    response = await api.get("/api/admin/metrics", headers=bearer(tokens))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["health"]["score"] == 100
    assert body["health"]["status"] == "healthy"
    assert body["http"]["requests"] >= 6
    assert body["http"]["p95_ms"] is not None
    assert body["database"]["pool_connections"] >= 1
    assert body["redis"] == {"up": True}
    assert {cache["name"] for cache in body["caches"]} >= {"privileges"}
    assert isinstance(body["jobs"], list)
    assert body["active_users_15m"] >= 1  # the admin who asked


async def test_clear_cache_empties_every_namespace_and_is_audited(
    id_app: FastAPI, api: httpx.AsyncClient
) -> None:
    _, tokens, _ = await make_admin(id_app, api)
    cache = id_app.state.runtime.cache
    await cache.set("admin-test:key", {"v": 1})
    assert await cache.get("admin-test:key") == {"v": 1}

    response = await api.post("/api/admin/clear-cache", headers=bearer(tokens))
    assert response.status_code == 200, response.text
    assert len(response.json()["cleared"]) == 2
    assert await cache.get("admin-test:key") is None

    async with id_app.state.runtime.db.session() as session:
        audited = await session.scalar(
            text(
                "SELECT count(*) FROM audit_log WHERE action = 'admin.cache.cleared' "
                "AND request_id = :rid"
            ),
            {"rid": response.headers["x-request-id"]},
        )
    assert audited == 1


async def test_dashboard_page_is_served_locked_down(api: httpx.AsyncClient) -> None:
    response = await api.get("/admin")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert "script-src 'self';" in response.headers["content-security-policy"]  # no inline
    assert 'action="/admin/login"' in response.text  # the console's sign-in form


async def test_metrics_list_idle_queues_too(id_app: FastAPI, api: httpx.AsyncClient) -> None:
    """Issue 12: only queues with work were listed, so an idle queue vanished."""
    import uuid

    from surge.kit.jobs import JobContext, job
    from surge.kit.jobs.registry import unregister

    queue = f"idle-{uuid.uuid4().hex[:8]}"
    name = f"test.{queue}.nothing"

    @job(name, queue=queue)
    async def nothing(ctx: JobContext) -> None:  # never enqueued: its queue stays idle
        return None

    try:
        _, tokens, _ = await make_admin(id_app, api)
        response = await api.get("/api/admin/metrics", headers=bearer(tokens))
        assert response.status_code == 200, response.text
        listed = {entry["queue"]: entry for entry in response.json()["jobs"]}
        assert queue in listed, sorted(listed)
        assert (listed[queue]["ready"], listed[queue]["active"]) == (0, 0)
    finally:
        unregister(name)
