"""The console at /admin through its forms (the browser test drives the same pages in
Chromium): sign-in, MFA enrolment, confirmation before every action, audit with actor,
request id, before and after, the read-only role, CSRF and cross-site refusal."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pyotp
from fastapi import FastAPI
from sqlalchemy import text

from surge.admin.console.timeseries import sampler
from surge.identity.service import identity as identity_service
from tests.fixtures.factories import PASSWORD
from tests.identity.conftest import app_settings, id_app, id_settings

__all__ = ["app_settings", "id_app", "id_settings"]


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


async def new_user(app: FastAPI, role: str, *, mfa: bool = False) -> tuple[str, str | None]:
    email = f"console-{role}-{uuid.uuid4().hex[:8]}@example.com"
    async with app.state.runtime.db.session() as session:
        user = await identity_service.register(
            session, app.state.runtime, email=email, password=PASSWORD, role=role
        )
        secret = None
        if mfa:
            secret = pyotp.random_base32()
            user.mfa_secret = secret
            user.mfa_enabled = True
        await session.commit()
    return email, secret


async def sign_in(api: httpx.AsyncClient, email: str, otp: str | None = None) -> httpx.Response:
    page = await api.get("/admin")
    form = {"csrf": csrf_of(page.text), "email": email, "password": PASSWORD, "otp": otp or ""}
    return await api.post("/admin/login", data=form)


async def signed_in(app: FastAPI, api: httpx.AsyncClient, role: str = "admin") -> str:
    """An operator with MFA, signed in to the console; returns the session's CSRF token."""
    email, secret = await new_user(app, role, mfa=True)
    assert secret is not None
    response = await sign_in(api, email, pyotp.TOTP(secret).now())
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/admin/overview"
    overview = await api.get("/admin/overview")
    assert overview.status_code == 200
    return csrf_of(overview.text)


async def audit_rows(app: FastAPI, action: str, subject_id: str) -> list[dict[str, Any]]:
    async with app.state.runtime.db.session() as session:
        rows = await session.execute(
            text(
                "SELECT actor_id, before, after, request_id FROM audit_log "
                "WHERE action = :a AND subject_id = :s"
            ),
            {"a": action, "s": subject_id},
        )
        return [dict(r._mapping) for r in rows]


class TestSignIn:
    async def test_sign_in_page_is_locked_down(self, api: httpx.AsyncClient) -> None:
        page = await api.get("/admin")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self';" in csp
        assert "frame-ancestors 'none'" in csp
        cookie = page.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie

    async def test_admin_without_mfa_enrols_in_the_page(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        email, _ = await new_user(id_app, "admin")
        response = await sign_in(api, email)
        assert response.status_code == 303
        assert "httponly" in response.headers["set-cookie"].lower()
        assert "samesite=strict" in response.headers["set-cookie"].lower()
        enrol = await api.get("/admin")
        assert "Set up the second factor" in enrol.text
        setup = await api.post("/admin/mfa/setup", data={"csrf": csrf_of(enrol.text)})
        assert setup.status_code == 200
        assert "<svg" in setup.text  # the QR code, inline
        secret = re.search(r'<code id="secret">([A-Z2-7]+)</code>', setup.text)
        assert secret is not None
        codes = re.findall(r"<li><code>([^<]+)</code></li>", setup.text)
        assert len(codes) >= 8
        # Before the code is confirmed, nothing else of the console opens.
        assert (await api.get("/admin/jobs")).status_code == 303
        verified = await api.post(
            "/admin/mfa/verify",
            data={"csrf": csrf_of(setup.text), "code": pyotp.TOTP(secret.group(1)).now()},
        )
        assert verified.status_code == 303, verified.text
        assert (await api.get("/admin/jobs")).status_code == 200

    async def test_wrong_password_is_refused(self, id_app: FastAPI, api: httpx.AsyncClient) -> None:
        email, _ = await new_user(id_app, "admin")
        page = await api.get("/admin")
        response = await api.post(
            "/admin/login",
            data={"csrf": csrf_of(page.text), "email": email, "password": "nope-nope-nope"},
        )
        assert response.status_code == 401
        assert (await api.get("/admin/overview")).status_code == 303

    async def test_a_partner_cannot_use_the_console(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        email, _ = await new_user(id_app, "partner")
        assert (await sign_in(api, email)).status_code == 403


class TestActions:
    async def test_pause_asks_then_pauses_and_audits(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api)
        queue = f"q-{uuid.uuid4().hex[:6]}"
        asked = await api.post(f"/admin/jobs/queues/{queue}/pause", data={"csrf": csrf})
        assert asked.status_code == 200
        assert "Confirm" in asked.text
        assert await audit_rows(id_app, "jobs.queue.pause", queue) == []  # nothing yet
        done = await api.post(
            f"/admin/jobs/queues/{queue}/pause",
            data={"csrf": csrf, "confirm": "yes"},
            headers={"X-Request-ID": f"req-{queue}"},
        )
        assert done.status_code == 303
        jobs_page = await api.get("/admin/jobs")
        assert f"resume-{queue}" in jobs_page.text
        [row] = await audit_rows(id_app, "jobs.queue.pause", queue)
        assert row["before"] == {"paused": False}
        assert row["after"] == {"paused": True}
        assert row["request_id"] == f"req-{queue}"
        assert row["actor_id"] is not None

    async def test_bulk_retry_shows_a_dry_run_count_first(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api)
        marker = uuid.uuid4().hex
        async with id_app.state.runtime.db.session() as session:
            for _ in range(3):
                await session.execute(
                    text(
                        "INSERT INTO jobs (queue, name, payload, state, finished_at, last_error) "
                        "VALUES ('console-test', 'console.test', CAST(:p AS jsonb), 'failed', "
                        "now(), 'boom')"
                    ),
                    {"p": f'{{"marker": "{marker}"}}'},
                )
            await session.commit()
        fields = {"csrf": csrf, "action": "retry", "search": marker}
        asked = await api.post("/admin/jobs/bulk", data=fields)
        assert 'id="dry-run-count">3<' in asked.text
        done = await api.post(
            "/admin/jobs/bulk", data={**fields, "confirm": "yes", "expected": "3"}
        )
        assert done.status_code == 303
        async with id_app.state.runtime.db.session() as session:
            states = (
                await session.execute(
                    text("SELECT state FROM jobs WHERE payload->>'marker' = :m"), {"m": marker}
                )
            ).scalars()
            assert sorted(states) == ["queued"] * 3
            await session.execute(
                text("DELETE FROM jobs WHERE payload->>'marker' = :m"), {"m": marker}
            )
            await session.commit()
        [row] = await audit_rows(id_app, "jobs.bulk.retry", f"search={marker}")
        assert row["before"]["matching"] == 3
        assert row["after"] == {"changed": 3}


class TestServiceKeys:
    async def test_create_shows_the_key_once_then_revoke_refuses_it(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api)
        name = f"exporter-{uuid.uuid4().hex[:6]}"
        fields = {"csrf": csrf, "name": name, "scopes": "revenue-events:write"}
        asked = await api.post("/admin/keys", data=fields)
        assert asked.status_code == 200
        assert 'id="confirm"' in asked.text
        assert "surge_sk_" not in asked.text  # nothing created before the confirmation
        created = await api.post(
            "/admin/keys", data={**fields, "confirm": "yes"}, headers={"X-Request-ID": name}
        )
        assert created.status_code == 200, created.text
        secret = re.search(r'<code id="secret">([^<]+)</code>', created.text)
        assert secret is not None, created.text
        key = secret.group(1)
        assert key.startswith("surge_sk_")
        listing = await api.get("/admin/keys")
        assert name in listing.text
        assert key not in listing.text  # shown once: never in the listing
        key_id = re.search(rf"<td>{name}</td>.*?/admin/keys/([0-9a-f-]+)/revoke", listing.text)
        assert key_id is not None, listing.text
        [created_row] = await audit_rows(id_app, "credential.key.created", key_id.group(1))
        assert created_row["request_id"] == name
        assert created_row["actor_id"] is not None
        asked = await api.post(f"/admin/keys/{key_id.group(1)}/revoke", data={"csrf": csrf})
        assert 'id="confirm"' in asked.text
        assert await audit_rows(id_app, "credential.key.revoked", key_id.group(1)) == []
        done = await api.post(
            f"/admin/keys/{key_id.group(1)}/revoke", data={"csrf": csrf, "confirm": "yes"}
        )
        assert done.status_code == 303
        [revoked] = await audit_rows(id_app, "credential.key.revoked", key_id.group(1))
        assert revoked["before"]["revoked"] is False
        assert revoked["after"]["revoked"] is True
        assert f"revoke-{key_id.group(1)}" not in (await api.get("/admin/keys")).text

    async def test_a_key_without_a_name_or_scope_is_refused_and_nothing_is_created(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api)
        async with id_app.state.runtime.db.session() as session:
            before = await session.scalar(text("SELECT count(*) FROM service_keys"))
        for fields in ({"name": " ", "scopes": "revenue-events:write"},
                       {"name": "no-scope"}, {"name": "bad", "scopes": "everything"}):  # fmt: skip
            refused = await api.post("/admin/keys", data={"csrf": csrf, "confirm": "yes", **fields})
            assert refused.status_code == 422, (fields, refused.text)
        async with id_app.state.runtime.db.session() as session:
            assert await session.scalar(text("SELECT count(*) FROM service_keys")) == before


class TestRefusals:
    async def test_read_only_admin_sees_but_cannot_act(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api, role="admin_readonly")
        for view in ("overview", "jobs", "withdrawals", "operations", "keys", "breakers",
                     "caches", "users", "audit", "alerts"):  # fmt: skip
            assert (await api.get(f"/admin/{view}")).status_code == 200, view
        refused = await api.post(
            "/admin/jobs/queues/default/pause", data={"csrf": csrf, "confirm": "yes"}
        )
        assert refused.status_code == 403
        assert "Read-only" in refused.text
        refused = await api.post("/admin/caches/clear", data={"csrf": csrf, "confirm": "yes"})
        assert refused.status_code == 403
        refused = await api.post(
            "/admin/keys", data={"csrf": csrf, "name": "ro", "scopes": "revenue-events:write",
                                 "confirm": "yes"},
        )  # fmt: skip
        assert refused.status_code == 403

    async def test_missing_csrf_token_is_refused(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        await signed_in(id_app, api)
        response = await api.post("/admin/caches/clear", data={"confirm": "yes"})
        assert response.status_code == 403

    async def test_cross_site_post_is_refused(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        csrf = await signed_in(id_app, api)
        response = await api.post(
            "/admin/caches/clear",
            data={"csrf": csrf, "confirm": "yes"},
            headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert response.status_code == 403


class TestOverview:
    async def test_sampler_points_become_charts(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        await signed_in(id_app, api)
        recorder = sampler(id_app.state.runtime)
        recorder.interval = 0.001  # each call below is its own interval (its own ticket)
        for _ in range(3):
            await api.get("/api/health")
            await recorder.sample()
        charts = await api.get("/admin/fragments/charts")
        assert charts.status_code == 200
        assert "<polyline" in charts.text
        alerts = await api.get("/admin/alerts")
        assert "HighErrorRatio" in alerts.text
        assert "LowCacheHitRatio" in alerts.text
