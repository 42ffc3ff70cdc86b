"""Scoped service keys (issue 16): revenue events from a server use an API key, not an
administrator's MFA session. Shown once, stored hashed, rotatable, revocable, audited."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from tests.fixtures.factories import Caller
from tests.wallet.conftest import admin, app_settings, second_admin, wallet_app, wallet_settings

__all__ = ["admin", "app_settings", "second_admin", "wallet_app", "wallet_settings"]


def event() -> dict[str, Any]:
    return {"id": f"evt-{uuid.uuid4().hex}", "kind": "sale", "profit": 1_000}


def key_header(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def issue(
    api: httpx.AsyncClient, admin: Caller, checker: Caller, scopes: list[str] | None = None
) -> dict[str, Any]:
    """A key made by ``admin`` and approved by ``checker`` (ADR 0059), ready to use."""
    response = await api.post(
        "/api/admin/service-keys",
        json={"name": "game-backend", "scopes": scopes or ["revenue-events:write"]},
        headers=admin.headers,
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    await approve(api, checker, body)
    return body


async def approve(api: httpx.AsyncClient, checker: Caller, issued: dict[str, Any]) -> None:
    approved = await api.post(
        f"/api/admin/approvals/{issued['approval_id']}/approve", headers=checker.headers
    )
    assert approved.status_code == 200, approved.text


class TestServiceKeys:
    async def test_a_key_records_revenue_events_without_an_admin_session(
        self, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        issued = await issue(api, admin, second_admin)
        assert issued["key"].startswith("surge_sk_")
        created = await api.post(
            "/api/v1/revenue-events", json=event(), headers=key_header(issued["key"])
        )
        assert created.status_code == 201, created.text

    async def test_shown_once_and_stored_hashed(
        self, api: httpx.AsyncClient, admin: Caller, second_admin: Caller, wallet_app: FastAPI
    ) -> None:
        issued = await issue(api, admin, second_admin)
        listed = await api.get("/api/admin/service-keys", headers=admin.headers)
        assert issued["key"] not in listed.text
        assert issued["prefix"] in listed.text
        async with wallet_app.state.runtime.db.session() as session:
            stored = await session.scalar(
                text("SELECT secret_hash FROM service_keys WHERE id = :i"), {"i": issued["id"]}
            )
        assert stored is not None
        assert issued["key"] not in stored
        assert len(stored) == 64  # a SHA-256

    async def test_wrong_or_missing_scope_and_unknown_keys_are_refused(
        self, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        issued = await issue(api, admin, second_admin)
        forged = issued["key"][:-4] + "AAAA"
        assert (
            await api.post("/api/v1/revenue-events", json=event(), headers=key_header(forged))
        ).status_code == 401
        assert (
            await api.post(
                "/api/admin/service-keys",
                json={"name": "x", "scopes": ["everything"]},
                headers=admin.headers,
            )
        ).status_code == 422
        # A service key is not an admin session: admin routes refuse it.
        assert (
            await api.get("/api/admin/service-keys", headers=key_header(issued["key"]))
        ).status_code == 401

    async def test_revoked_key_is_refused_and_audited(
        self, api: httpx.AsyncClient, admin: Caller, second_admin: Caller, wallet_app: FastAPI
    ) -> None:
        issued = await issue(api, admin, second_admin)
        revoked = await api.post(
            f"/api/admin/service-keys/{issued['id']}/revoke", headers=admin.headers
        )
        assert revoked.status_code == 200
        refused = await api.post(
            "/api/v1/revenue-events", json=event(), headers=key_header(issued["key"])
        )
        assert refused.status_code == 401
        async with wallet_app.state.runtime.db.session() as session:
            actions = set(
                (
                    await session.execute(
                        text("SELECT action FROM audit_log WHERE subject_id = :i"),
                        {"i": issued["id"]},
                    )
                ).scalars()
            )
        assert {"credential.key.created", "credential.key.revoked"} <= actions

    async def test_rotation_gives_a_new_key_and_ends_the_old_after_its_grace(
        self, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        issued = await issue(api, admin, second_admin)
        rotated = await api.post(
            f"/api/admin/service-keys/{issued['id']}/rotate",
            json={"grace_seconds": 0},
            headers=admin.headers,
        )
        assert rotated.status_code == 201, rotated.text
        new = rotated.json()
        assert new["key"] != issued["key"]
        waiting = await api.post(
            "/api/v1/revenue-events", json=event(), headers=key_header(new["key"])
        )
        assert waiting.status_code == 401  # a rotated key waits for its second admin too
        await approve(api, second_admin, new)
        ok = await api.post("/api/v1/revenue-events", json=event(), headers=key_header(new["key"]))
        assert ok.status_code == 201
        old = await api.post(
            "/api/v1/revenue-events", json=event(), headers=key_header(issued["key"])
        )
        assert old.status_code == 401

    async def test_rotation_with_grace_keeps_the_old_key_working(
        self, api: httpx.AsyncClient, admin: Caller, second_admin: Caller
    ) -> None:
        issued = await issue(api, admin, second_admin)
        rotated = await api.post(
            f"/api/admin/service-keys/{issued['id']}/rotate", headers=admin.headers
        )
        assert rotated.status_code == 201
        old = await api.post(
            "/api/v1/revenue-events", json=event(), headers=key_header(issued["key"])
        )
        assert old.status_code == 201  # the default grace: an hour to redeploy

    async def test_one_administrator_alone_cannot_mint_a_working_key(
        self, api: httpx.AsyncClient, admin: Caller, second_admin: Caller, wallet_app: FastAPI
    ) -> None:
        """Every key records revenue events, which credit partners: a key one administrator
        made alone was a way around four-eyes (ADR 0059). It is refused until a different
        administrator approves it; its maker cannot."""
        made = await api.post(
            "/api/admin/service-keys",
            json={"name": "side-door", "scopes": ["revenue-events:write"]},
            headers=admin.headers,
        )
        assert made.status_code == 201, made.text
        issued = made.json()
        assert issued["activated_at"] is None
        refused = await api.post(
            "/api/v1/revenue-events", json=event(), headers=key_header(issued["key"])
        )
        assert refused.status_code == 401, refused.text
        own = await api.post(
            f"/api/admin/approvals/{issued['approval_id']}/approve", headers=admin.headers
        )
        assert own.status_code == 403
        await approve(api, second_admin, issued)
        ok = await api.post(
            "/api/v1/revenue-events", json=event(), headers=key_header(issued["key"])
        )
        assert ok.status_code == 201, ok.text

    async def test_malformed_json_without_a_token_is_401(self, api: httpx.AsyncClient) -> None:
        response = await api.post(
            "/api/v1/revenue-events",
            content=b"{nope",
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 401
