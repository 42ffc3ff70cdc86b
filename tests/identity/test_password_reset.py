"""Password reset (issue 15): ``POST /auth/password/forgot`` → a job → an e-mailed
single-use link through the outbox and a real SMTP relay → ``POST /auth/password/reset``
with a new password → every session signed out, an audit entry, a "password changed" mail."""

from __future__ import annotations

import email
import re
import time
from collections.abc import Iterator
from email import policy
from typing import Any
from uuid import UUID

import httpx
import pytest
import redis.asyncio as redis_async
from fastapi import FastAPI
from sqlalchemy import text

from surge.config import Settings
from surge.identity.recovery import REQUESTED_JOB
from surge.identity.recovery import password_reset as password_reset_service
from surge.kit.runtime import Runtime
from surge.kit.security import hash_token
from surge.sim.smtp import SmtpSimulator
from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import PASSWORD, bearer, identity_settings, login, register
from tests.fixtures.smtp import smtp_relay
from tests.fixtures.waiting import eventually
from tests.fixtures.workers import running_worker

NEW_PASSWORD = "a-brand-new-passphrase"
LINK = re.compile(r"reset-password\?token=([A-Za-z0-9_\-]+)")


@pytest.fixture
def relay() -> Iterator[SmtpSimulator]:
    with smtp_relay() as sim:
        yield sim


@pytest.fixture
def reset_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def app_settings(
    server_urls: tuple[str, str], relay: SmtpSimulator, reset_overrides: dict[str, Any]
) -> Settings:
    return identity_settings(
        *server_urls, NOTIFY_SMTP_PORT=relay.port, BREAKER_FLEET=False, **reset_overrides
    )


@pytest.fixture(autouse=True)
async def fresh_budgets(redis_client: redis_async.Redis) -> None:
    """Every test starts with untouched reset budgets (the counters live in Redis)."""
    keys = [key async for key in redis_client.scan_iter(match="surge:auth:pr:*")]
    if keys:
        await redis_client.delete(*keys)


async def scalar(runtime: Runtime, sql: str, **params: Any) -> Any:
    async with runtime.db.session() as session:
        return await session.scalar(text(sql), params)


async def jobs_for(runtime: Runtime, address: str) -> int:
    return int(
        await scalar(
            runtime,
            "SELECT count(*) FROM jobs WHERE name = :n AND payload->>'email' = :e",
            n=REQUESTED_JOB,
            e=address,
        )
    )


async def forgot(api: httpx.AsyncClient, address: str) -> httpx.Response:
    return await api.post("/api/v1/auth/password/forgot", json={"email": address})


async def issue(runtime: Runtime, address: str) -> UUID | None:
    """What the job does (tests that need no worker call it directly)."""
    async with runtime.db.session() as session:
        return await password_reset_service.issue(session, runtime, email=address, ip="10.0.0.1")


async def mailed_token(runtime: Runtime, relay: SmtpSimulator, address: str) -> str:
    """Send the outbox (an in-process ``email`` worker) and read the link the relay got."""
    found: list[str] = []

    async def arrived() -> bool:
        for message in relay.messages:
            if address in message.rcpt_tos:
                parsed = email.message_from_bytes(message.data, policy=policy.default)
                if parsed["Subject"] == "Reset your Surge password":
                    body = parsed.get_body(("plain",))
                    assert body is not None
                    match = LINK.search(body.get_content())
                    assert match is not None
                    found.append(match.group(1))
                    return True
        return False

    async with running_worker(runtime, ["email"]):
        await eventually(arrived, timeout=20, interval=0.05)
    return found[-1]


async def reset(api: httpx.AsyncClient, token: str, password: str = NEW_PASSWORD) -> httpx.Response:
    return await api.post(
        "/api/v1/auth/password/reset", json={"token": token, "password": password}
    )


class TestForgot:
    async def test_known_and_unknown_addresses_get_the_same_answer_and_the_same_work(
        self, app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        runtime = runtime_of(app)
        known, _ = await register(api)
        unknown = f"nobody-{time.time_ns()}@example.com"
        answers = [await forgot(api, known), await forgot(api, unknown)]
        assert [a.status_code for a in answers] == [202, 202]
        assert answers[0].content == answers[1].content
        # The request looked nothing up: one job each, no token and no mail yet for either.
        assert await jobs_for(runtime, known) == 1
        assert await jobs_for(runtime, unknown) == 1
        assert await scalar(
            runtime, "SELECT count(*) FROM password_reset_tokens t JOIN users u "
            "ON u.id = t.user_id WHERE u.email = :e", e=known,
        ) == 0  # fmt: skip

    async def test_the_job_mails_a_link_and_stores_only_a_hash(
        self, app: FastAPI, api: httpx.AsyncClient, relay: SmtpSimulator
    ) -> None:
        runtime = runtime_of(app)
        address, user_id = await register(api)
        assert (await forgot(api, address)).status_code == 202
        async with running_worker(runtime, ["identity"]):
            await eventually(lambda: _has_token(runtime, user_id), timeout=20, interval=0.05)
        token = await mailed_token(runtime, relay, address)
        stored = await scalar(
            runtime, "SELECT token_hash FROM password_reset_tokens WHERE user_id = :u", u=user_id
        )
        assert stored == hash_token(token)
        # Neither the token table nor the outbox row holds the raw token.
        dump = await scalar(
            runtime, "SELECT string_agg(context::text, ' ') FROM notification_messages "
            "WHERE user_id = :u AND template = 'password_reset'", u=user_id,
        )  # fmt: skip
        assert dump is not None
        assert token not in dump
        assert "__sealed__" in dump

    async def test_an_unknown_address_gets_no_token_and_no_mail(self, app: FastAPI) -> None:
        runtime = runtime_of(app)
        address = f"ghost-{time.time_ns()}@example.com"
        assert await issue(runtime, address) is None
        assert await scalar(
            runtime, "SELECT count(*) FROM notification_messages WHERE to_address = :a", a=address
        ) == 0  # fmt: skip


async def _has_token(runtime: Runtime, user_id: str) -> bool:
    found = await scalar(
        runtime, "SELECT count(*) FROM password_reset_tokens WHERE user_id = :u", u=user_id
    )
    return bool(found)


class TestReset:
    async def test_reset_signs_out_everywhere_audits_and_says_so_by_mail(
        self, app: FastAPI, api: httpx.AsyncClient, relay: SmtpSimulator
    ) -> None:
        runtime = runtime_of(app)
        address, user_id = await register(api)
        first, second = await login(api, address), await login(api, address)
        assert (await api.get("/api/v1/me", headers=bearer(first))).status_code == 200
        await issue(runtime, address)
        token = await mailed_token(runtime, relay, address)

        done = await reset(api, token)
        assert done.status_code == 204, done.text
        # Every session is over: access tokens and refresh tokens alike.
        for tokens in (first, second):
            assert (await api.get("/api/v1/me", headers=bearer(tokens))).status_code == 401
            again = await api.post(
                "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
            )
            assert again.status_code == 401
        old = await api.post("/api/v1/auth/login", json={"email": address, "password": PASSWORD})
        assert old.status_code == 401
        new = await api.post(
            "/api/v1/auth/login", json={"email": address, "password": NEW_PASSWORD}
        )
        assert new.status_code == 200, new.text
        assert await scalar(
            runtime, "SELECT count(*) FROM audit_log WHERE action = 'identity.password.reset' "
            "AND subject_id = :u", u=user_id,
        ) == 1  # fmt: skip
        assert await scalar(
            runtime, "SELECT count(*) FROM notification_messages WHERE user_id = :u "
            "AND template = 'password_changed' AND category = 'security'", u=user_id,
        ) == 1  # fmt: skip

    async def test_a_token_works_once(self, app: FastAPI, api: httpx.AsyncClient,
                                      relay: SmtpSimulator) -> None:  # fmt: skip
        runtime = runtime_of(app)
        address, _ = await register(api)
        await issue(runtime, address)
        token = await mailed_token(runtime, relay, address)
        assert (await reset(api, token)).status_code == 204
        replay = await reset(api, token, "yet-another-passphrase")
        assert replay.status_code == 400
        assert replay.headers["content-type"].startswith("application/problem+json")
        assert (await api.post(
            "/api/v1/auth/login", json={"email": address, "password": NEW_PASSWORD}
        )).status_code == 200  # fmt: skip

    async def test_an_expired_token_is_refused(
        self, app: FastAPI, api: httpx.AsyncClient, relay: SmtpSimulator
    ) -> None:
        runtime = runtime_of(app)
        address, user_id = await register(api)
        await issue(runtime, address)
        token = await mailed_token(runtime, relay, address)
        async with runtime.db.session() as session:
            await session.execute(
                text("UPDATE password_reset_tokens SET expires_at = now() - interval '1 second' "
                     "WHERE user_id = :u"), {"u": user_id},
            )  # fmt: skip
        assert (await reset(api, token)).status_code == 400
        assert (await api.post(
            "/api/v1/auth/login", json={"email": address, "password": PASSWORD}
        )).status_code == 200  # fmt: skip

    async def test_a_newer_request_supersedes_the_older_link(
        self, app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        runtime = runtime_of(app)
        address, user_id = await register(api)
        # Two links; the raw tokens are read back through the relay in the other tests, here
        # they are sealed in the outbox rows: open them as the renderer does.
        await issue(runtime, address)
        await issue(runtime, address)
        older, newer = await _sealed_links(runtime, user_id)
        assert (await reset(api, older)).status_code == 400
        assert (await reset(api, newer)).status_code == 204

    async def test_a_weak_password_is_422_and_the_token_survives(
        self, app: FastAPI, api: httpx.AsyncClient, relay: SmtpSimulator
    ) -> None:
        runtime = runtime_of(app)
        address, _ = await register(api)
        await issue(runtime, address)
        token = await mailed_token(runtime, relay, address)
        weak = await reset(api, token, "short")
        assert weak.status_code == 422
        assert weak.headers["content-type"].startswith("application/problem+json")
        assert (await reset(api, token)).status_code == 204

    async def test_a_forged_token_is_refused(self, api: httpx.AsyncClient) -> None:
        response = await reset(api, "A" * 43)
        assert response.status_code == 400
        assert response.headers["content-type"].startswith("application/problem+json")


async def _sealed_links(runtime: Runtime, user_id: str) -> list[str]:
    from surge.notifications.outbox import SEALED, open_secrets

    async with runtime.db.session() as session:
        rows = await session.execute(
            text("SELECT context FROM notification_messages WHERE user_id = :u "
                 "AND template = 'password_reset' ORDER BY created_at, id"), {"u": user_id},
        )  # fmt: skip
        contexts = [row[0] for row in rows]
    links = []
    for context in contexts:
        url = open_secrets(runtime.settings, context[SEALED])["reset_url"]
        match = LINK.search(url)
        assert match is not None
        links.append(match.group(1))
    return links


class TestBudgets:
    @pytest.fixture
    def reset_overrides(self) -> dict[str, Any]:
        return {"AUTH_PASSWORD_RESET_MAX_PER_IP": 3, "AUTH_PASSWORD_RESET_MAX_PER_ADDRESS": 2}

    async def test_past_the_address_budget_the_answer_is_the_same_and_nothing_is_sent(
        self, app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        runtime = runtime_of(app)
        address, _ = await register(api)
        answers = [await forgot(api, address) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 202]
        assert len({a.content for a in answers}) == 1
        assert await jobs_for(runtime, address) == 2

    async def test_past_the_ip_budget_it_is_429(self, api: httpx.AsyncClient) -> None:
        answers = [await forgot(api, f"x{i}-{time.time_ns()}@example.com") for i in range(4)]
        assert [a.status_code for a in answers] == [202, 202, 202, 429]
        assert answers[-1].headers["content-type"].startswith("application/problem+json")
        assert int(answers[-1].headers["Retry-After"]) > 0
