"""Second attack round (ADR 0035): authentication and its limits, driven against the real
app as a hostile client would — a spoofed X-Forwarded-For, lock-out as an existence oracle,
a refresh token replayed after logout, a service key outside its scope, a planted console
session, console POST forms without their CSRF token, a redirect target from the query."""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from typing import Any

import httpx
import pyotp
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

import surge.admin.console.pages as console_pages
from surge.admin.console.routes import router as console_router
from surge.admin.console.session import COOKIE
from tests.admin.test_console import new_user, sign_in, signed_in
from tests.fixtures.factories import (
    PASSWORD,
    bearer,
    identity_of,
    login,
    make_admin,
    register,
    unique_email,
)

LOGIN = "/api/v1/auth/login"


def console_posts() -> list[str]:
    """Every POST route of the console (its own router and each page's), but the sign-in
    form's (its pre-session token is tested on its own)."""
    found = [r.path for r in console_router.routes if isinstance(r, APIRoute)
             and "POST" in (r.methods or set())]  # fmt: skip
    for module in pkgutil.iter_modules(console_pages.__path__):
        router = importlib.import_module(f"{console_pages.__name__}.{module.name}").router
        found += [f"/admin{r.path}" for r in router.routes if isinstance(r, APIRoute)
                  and "POST" in (r.methods or set())]  # fmt: skip
    return [path for path in found if path != "/admin/login"]


class TestForwardedForFromAnUntrustedPeer:
    async def test_rotating_the_header_does_not_reset_the_ip_budget(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """The peer (203.0.113.50) is not a trusted proxy: whatever X-Forwarded-For it
        claims, its guesses count against its own address, across accounts."""
        guard = identity_of(id_app).login_guard
        guard.max_per_ip, guard.max_per_account = 3, 100
        transport = httpx.ASGITransport(app=id_app, client=("203.0.113.50", 40_000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as peer:
            statuses = []
            for i in range(6):
                response = await peer.post(
                    LOGIN,
                    json={"email": f"nobody-{uuid.uuid4().hex[:8]}@example.com",
                          "password": "guess-guess"},
                    headers={"X-Forwarded-For": f"198.51.100.{i + 1}"},
                )  # fmt: skip
                statuses.append(response.status_code)
        assert statuses == [401, 401, 401, 429, 429, 429]
        # The spoofed addresses were never charged: a real client there is unaffected.
        email, _ = await register(api)
        honest = await api.post(
            LOGIN, json={"email": email, "password": PASSWORD},
            headers={"X-Forwarded-For": "198.51.100.1"},
        )  # fmt: skip
        assert honest.status_code == 200


class TestNoExistenceOracle:
    async def test_lock_out_answers_alike_for_known_and_unknown_addresses(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """If only real accounts locked, six wrong guesses would tell which addresses exist."""
        guard = identity_of(id_app).login_guard
        guard.max_per_account, guard.max_per_ip = 3, 1_000
        known, _ = await register(api)
        unknown = f"nobody-{uuid.uuid4().hex[:8]}@example.com"
        answers: dict[str, list[Any]] = {}
        for email in (known, unknown):
            replies = [
                await api.post(LOGIN, json={"email": email, "password": "wrong-guess-x"})
                for _ in range(4)
            ]
            answers[email] = [(r.status_code, r.json().get("detail")) for r in replies]
        assert answers[known] == answers[unknown]
        assert [status for status, _ in answers[known]] == [401, 401, 401, 429]

    async def test_registration_does_the_same_work_for_a_taken_address(
        self, api: httpx.AsyncClient, id_app: FastAPI, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The answer is the same 202; the work must be too (one password hash each), or
        the response time tells a taken address from a free one."""
        hasher = identity_of(id_app).hasher
        hashed: list[str] = []
        real = hasher.hash

        async def counting(password: str) -> str:
            hashed.append(password)
            return await real(password)

        monkeypatch.setattr(hasher, "hash", counting)
        taken, _ = await register(api)
        hashed.clear()
        body = {"password": "correct horse battery staple"}
        fresh = await api.post("/api/v1/auth/register", json={**body, "email": unique_email()})
        work_fresh = len(hashed)
        again = await api.post("/api/v1/auth/register", json={**body, "email": taken})
        assert fresh.status_code == again.status_code == 202
        assert fresh.json() == again.json()
        assert work_fresh == len(hashed) - work_fresh == 1


class TestRefreshAfterLogout:
    async def test_a_refresh_token_is_dead_after_logout(self, api: httpx.AsyncClient) -> None:
        email, _ = await register(api)
        tokens = await login(api, email)
        out = await api.post("/api/v1/auth/logout", headers=bearer(tokens))
        assert out.status_code == 204
        replay = await api.post(
            "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        assert replay.status_code == 401, replay.text
        assert replay.headers["content-type"] == "application/problem+json"


class TestServiceKeyScope:
    async def test_a_service_key_is_no_user_and_no_admin(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """A key granted revenue-events:write opens that route only: not a partner's wallet,
        not the admin API, not the identity of a user."""
        _, tokens, _ = await make_admin(id_app, api)
        issued = await api.post(
            "/api/admin/service-keys",
            json={"name": f"k-{uuid.uuid4().hex[:6]}", "scopes": ["revenue-events:write"]},
            headers=bearer(tokens),
        )
        assert issued.status_code == 201, issued.text
        key = {"Authorization": f"Bearer {issued.json()['key']}"}
        for method, path in (
            ("GET", "/api/v1/me"),
            ("GET", "/api/v1/wallet"),
            ("POST", "/api/v1/withdrawals"),
            ("GET", "/api/admin/withdrawals"),
            ("POST", "/api/admin/service-keys"),
            ("GET", "/api/admin/audit-log"),
        ):
            response = await api.request(
                method, path, headers={**key, "Idempotency-Key": "k"}, json={"amount": 1_000}
            )
            assert response.status_code in (401, 403), (path, response.status_code)


class TestConsoleSession:
    async def test_a_planted_session_cookie_is_not_adopted(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """Session fixation: the attacker plants a cookie value, the victim signs in; the
        signed-in session has a new id and the planted one opens nothing."""
        planted = "attacker-chosen-" + uuid.uuid4().hex
        api.cookies.set(COOKIE, planted)
        email, secret = await new_user(id_app, "admin", mfa=True)
        assert secret is not None
        signed = await sign_in(api, email, pyotp.TOTP(secret).now())
        assert signed.status_code == 303
        issued = signed.cookies.get(COOKIE)
        assert issued
        assert issued != planted
        transport = httpx.ASGITransport(app=id_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as attacker:
            attacker.cookies.set(COOKIE, planted)
            page = await attacker.get("/admin/overview")
            assert page.status_code == 303  # back to the sign-in page
            assert page.headers["location"] == "/admin"

    async def test_no_redirect_target_is_taken_from_the_request(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        email, secret = await new_user(id_app, "admin", mfa=True)
        assert secret is not None
        await api.get("/admin", params={"next": "https://evil.example/", "return_to": "//evil"})
        signed = await sign_in(api, email, pyotp.TOTP(secret).now())
        assert signed.headers["location"] == "/admin/overview"

    async def test_every_console_post_refuses_a_missing_csrf_token(
        self, id_app: FastAPI, api: httpx.AsyncClient
    ) -> None:
        """Enumerated from the app, so a new form that forgets ``posted()`` fails here."""
        csrf = await signed_in(id_app, api)
        posts = console_posts()
        assert len(posts) >= 10, posts
        fill = {"withdrawal_id": str(uuid.uuid4()), "operation_id": str(uuid.uuid4()),
                "user_id": str(uuid.uuid4()), "key_id": str(uuid.uuid4()),
                "approval_id": str(uuid.uuid4()),
                "queue": "default", "verb": "approve"}  # fmt: skip
        for template in posts:
            path = template.format(**fill)
            # The enrolment forms answer a signed-in session "sign in first" before reading
            # the form (their own CSRF check runs for an enrolling session): nothing happens.
            refused = {401, 403} if path.startswith("/admin/mfa/") else {403}
            for data in ({"confirm": "yes"}, {"confirm": "yes", "csrf": "forged-" + csrf[:8]}):
                response = await api.post(path, data=data)
                assert response.status_code in refused, (path, data, response.status_code)
            cross = await api.post(
                path, data={"csrf": csrf, "confirm": "yes"},
                headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
            )  # fmt: skip
            assert cross.status_code in refused, (path, cross.status_code)
        # The sign-in form's own token: a login CSRF (signing the victim in as the
        # attacker) is refused too.
        login_csrf = await api.post(
            "/admin/login", data={"email": "a@example.com", "password": PASSWORD, "otp": ""}
        )
        assert login_csrf.status_code == 403


class TestSecondFactorGuessing:
    async def test_a_session_from_before_enrolment_cannot_guess_codes(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """Session B was opened with the password alone, before the owner enrolled on
        session A. B's owner (or whoever stole B's tokens) may call ``/auth/mfa/verify``:
        every wrong code spends the account's sign-in failure budget, so B gets as many
        guesses as a sign-in would (ADR 0051) — then even the right code is a 429. (The
        guesses come from an address of their own: the suite's shared Redis keeps the
        per-IP failure counts of 127.0.0.1 for every other test.)"""
        identity = identity_of(id_app)
        budget = identity.login_guard.max_per_account
        email, _ = await register(api)
        owner = await login(api, email)
        stolen = await login(api, email)
        setup = (await api.post("/api/v1/auth/mfa/setup", headers=bearer(owner))).json()
        code = identity.totp.now(setup["secret"])
        enrolled = await api.post(
            "/api/v1/auth/mfa/verify", json={"code": code}, headers=bearer(owner)
        )
        assert enrolled.status_code == 200, enrolled.text
        wrong = f"{(int(code) + 500_000) % 1_000_000:06d}"
        transport = httpx.ASGITransport(app=id_app, client=("198.51.100.7", 40_000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as thief:
            statuses = [
                (
                    await thief.post(
                        "/api/v1/auth/mfa/verify", json={"code": wrong}, headers=bearer(stolen)
                    )
                ).status_code
                for _ in range(budget + 2)
            ]
            assert statuses == [401] * budget + [429] * 2, statuses
            backup = setup["backup_codes"][0]  # a valid code the attacker guessed or stole
            right = await thief.post(
                "/api/v1/auth/mfa/verify", json={"code": backup}, headers=bearer(stolen)
            )
            assert right.status_code == 429, right.text
        me = await api.get("/api/v1/me", headers=bearer(stolen))
        assert me.status_code == 200  # still signed in, still without a second factor
