"""Every auth flow against real PostgreSQL and Redis, through the HTTP API."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from surge.config import Settings
from surge.identity.service import identity as identity_service
from tests.fixtures.factories import (
    PASSWORD,
    bearer,
    identity_of,
    login,
    make_admin,
    register,
    unique_email,
)
from tests.fixtures.waiting import eventually

PROBLEM = "application/problem+json"


class TestRegisterAndLogin:
    async def test_register_login_me(self, api: httpx.AsyncClient) -> None:
        email, user_id = await register(api)
        tokens = await login(api, email)
        assert tokens["token_type"] == "bearer"
        assert tokens["expires_in"] == 15 * 60
        me = await api.get("/api/v1/me", headers=bearer(tokens))
        assert me.status_code == 200
        assert me.json()["id"] == user_id
        assert me.json()["email"] == email
        assert me.json()["role"] == "user"

    async def test_a_taken_email_gets_the_same_answer(self, api: httpx.AsyncClient) -> None:
        """409 for a taken address told anyone who has an account (issue 16)."""
        fresh = await api.post(
            "/api/v1/auth/register", json={"email": unique_email(), "password": PASSWORD}
        )
        email, _ = await register(api)
        again = await api.post(
            "/api/v1/auth/register", json={"email": email.upper(), "password": "another-one-1"}
        )
        assert again.status_code == fresh.status_code == 202
        assert again.json() == fresh.json()
        await login(api, email)  # the original password still works: nothing was overwritten

    async def test_concurrent_registrations_create_one_account(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        email = unique_email()
        body = {"email": email, "password": PASSWORD}
        results = await asyncio.gather(
            *(api.post("/api/v1/auth/register", json=body) for _ in range(4))
        )
        assert [r.status_code for r in results] == [202] * 4
        async with id_app.state.runtime.db.session() as session:
            count = await session.scalar(
                text("SELECT count(*) FROM users WHERE email = :e"), {"e": email}
            )
        assert count == 1


class TestEmailNormalisation:
    async def test_nfkc_and_case_fold_to_one_account(self, api: httpx.AsyncClient) -> None:
        local = f"wide-{uuid.uuid4().hex[:8]}"
        fullwidth = "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in local.upper())
        await register(api, f"{local}@example.com")
        # ＷＩＤＥ-… in fullwidth capitals is the same address after NFKC and lower-casing.
        await login(api, f"{fullwidth}@EXAMPLE.com")

    async def test_a_look_alike_of_an_existing_address_is_refused(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        local = f"paypal-{uuid.uuid4().hex[:8]}"
        await register(api, f"{local}@example.com")
        lookalike = f"p\u0430{local[2:]}@example.com"  # Cyrillic а for the Latin a
        assert lookalike != f"{local}@example.com"
        answer = await api.post(
            "/api/v1/auth/register", json={"email": lookalike, "password": PASSWORD}
        )
        assert answer.status_code == 202  # the same answer: nothing is revealed...
        async with id_app.state.runtime.db.session() as session:
            found = await session.scalar(
                text("SELECT count(*) FROM users WHERE email = :e"), {"e": lookalike}
            )
        assert found == 0  # ...and no second account looks like the first
        wrong = await api.post(
            "/api/v1/auth/login", json={"email": lookalike, "password": PASSWORD}
        )
        assert wrong.status_code == 401

    async def test_a_distinct_ascii_address_still_registers(self, api: httpx.AsyncClient) -> None:
        local = f"paypal-{uuid.uuid4().hex[:8]}"
        await register(api, f"{local}@example.com")
        await register(api, f"{local.replace('l', '1', 1)}@example.com")  # not a look-alike

    async def test_wrong_password_and_unknown_user_look_the_same(
        self, api: httpx.AsyncClient
    ) -> None:
        email, _ = await register(api)
        wrong = await api.post("/api/v1/auth/login", json={"email": email, "password": "nope-nope"})
        unknown = await api.post(
            "/api/v1/auth/login", json={"email": unique_email(), "password": PASSWORD}
        )
        assert wrong.status_code == unknown.status_code == 401
        assert wrong.json()["detail"] == unknown.json()["detail"]
        assert wrong.headers["www-authenticate"].startswith("Bearer")

    async def test_no_token_is_401_problem(self, api: httpx.AsyncClient) -> None:
        response = await api.get("/api/v1/me")
        assert response.status_code == 401
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["www-authenticate"].startswith("Bearer")

    async def test_password_rehashed_when_parameters_change(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        email, _ = await register(api)
        identity = identity_of(id_app)
        from surge.identity import repository
        from surge.kit.security import PasswordHasher

        async with id_app.state.runtime.db.session() as session:
            user = await repository.user_by_email(session, email)
            assert user is not None
            old_hash = user.password_hash
        assert "m=1024,t=1" in old_hash
        identity.hasher = PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1)
        await login(api, email)
        async with id_app.state.runtime.db.session() as session:
            user = await repository.user_by_email(session, email)
            assert user is not None
            assert "m=2048,t=2" in user.password_hash
        await login(api, email)  # the new hash verifies


class TestBruteForce:
    async def test_account_locked_after_failures_then_429(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        email, _ = await register(api)
        identity_of(id_app).login_guard.max_per_account = 3
        for _ in range(3):
            bad = await api.post("/api/v1/auth/login", json={"email": email, "password": "x" * 9})
            assert bad.status_code == 401
        locked = await api.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert locked.status_code == 429
        assert int(locked.headers["retry-after"]) >= 1
        # Another account from the same IP is not locked by this one.
        other, _ = await register(api)
        await login(api, other)

    async def test_concurrent_guesses_cannot_outrun_the_budget(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """A slot is reserved before the (slow) password hash runs: 60 guesses sent at
        once get exactly the budget's worth of answers, and the right password sent last
        in the burst is refused like the others."""
        email, _ = await register(api)
        guard = identity_of(id_app).login_guard
        guard.max_per_account, guard.max_per_ip = 10, 1_000
        bodies = [{"email": email, "password": f"wrong-{i}-guess"} for i in range(59)]
        bodies.append({"email": email, "password": PASSWORD})
        replies = await asyncio.gather(
            *(api.post("/api/v1/auth/login", json=body) for body in bodies)
        )
        statuses = [r.status_code for r in replies]
        assert statuses.count(401) <= 10, statuses
        assert statuses.count(401) + statuses.count(429) + statuses.count(200) == 60
        if statuses[-1] == 200:  # it may have been among the first ten served...
            assert statuses.count(401) <= 9
        else:
            assert statuses[-1] == 429

    async def test_a_correct_login_and_an_mfa_prompt_spend_no_budget(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        email, _ = await register(api)
        guard = identity_of(id_app).login_guard
        guard.max_per_account = 2
        for _ in range(5):  # reservations given back on success
            api.cookies.clear()  # no device token: the account's budget is the one counted
            await login(api, email)
        api.cookies.clear()
        bad = {"email": email, "password": "x" * 9}
        assert (await api.post("/api/v1/auth/login", json=bad)).status_code == 401
        assert (await api.post("/api/v1/auth/login", json=bad)).status_code == 401
        assert (await api.post("/api/v1/auth/login", json=bad)).status_code == 429

    async def test_ipv6_callers_are_counted_per_64(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """One host owns a whole /64 and can rotate through it: the per-IP budget counts
        the /64, as the rate limiter does."""
        guard = identity_of(id_app).login_guard
        guard.max_per_ip, guard.max_per_account = 3, 100
        net = f"2001:db8:{uuid.uuid4().int % 65_000 + 1:x}:2"
        statuses = []
        for i in range(6):
            response = await api.post(
                "/api/v1/auth/login",
                json={"email": unique_email(), "password": "guess-guess"},
                headers={"X-Forwarded-For": f"{net}::{i + 1:x}"},
            )
            statuses.append(response.status_code)
        assert statuses == [401, 401, 401, 429, 429, 429]

    async def test_ip_budget_spans_accounts_behind_a_trusted_proxy(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """The per-IP budget counts the client named by X-Forwarded-For (the ASGI peer,
        127.0.0.1, is a trusted proxy by default), across accounts."""
        guard = identity_of(id_app).login_guard
        guard.max_per_ip = 3
        guard.max_per_account = 100
        attacker = {"X-Forwarded-For": f"203.0.113.{uuid.uuid4().int % 250 + 1}"}
        for _ in range(3):
            response = await api.post(
                "/api/v1/auth/login",
                json={"email": unique_email(), "password": "guess-guess"},
                headers=attacker,
            )
            assert response.status_code == 401
        email, _ = await register(api)
        body = {"email": email, "password": PASSWORD}
        blocked = await api.post("/api/v1/auth/login", json=body, headers=attacker)
        assert blocked.status_code == 429
        other = await api.post(
            "/api/v1/auth/login", json=body, headers={"X-Forwarded-For": "198.51.100.9"}
        )
        assert other.status_code == 200


class TestRefreshRotation:
    async def test_refresh_rotates(self, api: httpx.AsyncClient) -> None:
        email, _ = await register(api)
        first = await login(api, email)
        second = (
            await api.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
        ).json()
        assert second["refresh_token"] != first["refresh_token"]
        assert second["session_id"] == first["session_id"]
        third = await api.post(
            "/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}
        )
        assert third.status_code == 200
        me = await api.get("/api/v1/me", headers=bearer(third.json()))
        assert me.status_code == 200

    async def test_reuse_revokes_the_family(self, api: httpx.AsyncClient) -> None:
        email, _ = await register(api)
        first = await login(api, email)
        rotated = (
            await api.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
        ).json()
        # The stolen (already used) token is replayed:
        replay = await api.post(
            "/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
        )
        assert replay.status_code == 401
        assert replay.headers["content-type"] == PROBLEM
        # ...and the legitimate, newest token of the family is dead too,
        newest = await api.post(
            "/api/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]}
        )
        assert newest.status_code == 401
        # ...as are the access tokens of that session, immediately.
        for access in (first, rotated):
            assert (await api.get("/api/v1/me", headers=bearer(access))).status_code == 401

    async def test_concurrent_refresh_with_one_token_succeeds_once(
        self, api: httpx.AsyncClient
    ) -> None:
        email, _ = await register(api)
        tokens = await login(api, email)
        results = await asyncio.gather(
            *(
                api.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
                for _ in range(4)
            )
        )
        assert sorted(r.status_code for r in results) == [200, 401, 401, 401]

    async def test_unknown_refresh_token(self, api: httpx.AsyncClient) -> None:
        response = await api.post("/api/v1/auth/refresh", json={"refresh_token": "garbage"})
        assert response.status_code == 401


class TestSessions:
    async def test_sixth_login_evicts_the_first(self, api: httpx.AsyncClient) -> None:
        email, _ = await register(api)
        logins = [await login(api, email, **{"user-agent": f"device-{i}"}) for i in range(6)]
        assert (await api.get("/api/v1/me", headers=bearer(logins[0]))).status_code == 401
        evicted = await api.post(
            "/api/v1/auth/refresh", json={"refresh_token": logins[0]["refresh_token"]}
        )
        assert evicted.status_code == 401
        for tokens in logins[1:]:
            assert (await api.get("/api/v1/me", headers=bearer(tokens))).status_code == 200
        listed = await api.get("/api/v1/auth/sessions", headers=bearer(logins[5]))
        body = listed.json()
        assert [s["user_agent"] for s in body["items"]] == [f"device-{i}" for i in range(1, 6)]
        assert [s["current"] for s in body["items"]] == [False] * 4 + [True]
        assert body["next_cursor"] is None

    async def test_sessions_cursor_pagination(self, api: httpx.AsyncClient) -> None:
        email, _ = await register(api)
        logins = [await login(api, email) for _ in range(3)]
        first = (await api.get("/api/v1/auth/sessions?limit=2", headers=bearer(logins[-1]))).json()
        assert len(first["items"]) == 2
        assert first["next_cursor"]
        rest = (
            await api.get(
                f"/api/v1/auth/sessions?limit=2&cursor={first['next_cursor']}",
                headers=bearer(logins[-1]),
            )
        ).json()
        assert len(rest["items"]) == 1
        assert rest["next_cursor"] is None
        ids = [s["id"] for s in first["items"] + rest["items"]]
        assert ids == [t["session_id"] for t in logins]
        too_many = await api.get("/api/v1/auth/sessions?limit=101", headers=bearer(logins[0]))
        assert too_many.status_code == 422

    async def test_revoke_one_device(self, api: httpx.AsyncClient) -> None:
        email, _ = await register(api)
        phone, laptop = await login(api, email), await login(api, email)
        response = await api.delete(
            f"/api/v1/auth/sessions/{phone['session_id']}", headers=bearer(laptop)
        )
        assert response.status_code == 204
        assert (await api.get("/api/v1/me", headers=bearer(phone))).status_code == 401
        assert (await api.get("/api/v1/me", headers=bearer(laptop))).status_code == 200
        # Someone else's session is not found (not "forbidden": no existence oracle).
        other, _ = await register(api)
        theirs = await login(api, other)
        response = await api.delete(
            f"/api/v1/auth/sessions/{theirs['session_id']}", headers=bearer(laptop)
        )
        assert response.status_code == 404

    async def test_logout_is_immediate(self, api: httpx.AsyncClient) -> None:
        email, _ = await register(api)
        tokens = await login(api, email)
        assert (await api.post("/api/v1/auth/logout", headers=bearer(tokens))).status_code == 204
        assert (await api.get("/api/v1/me", headers=bearer(tokens))).status_code == 401
        refresh = await api.post(
            "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        assert refresh.status_code == 401

    async def test_logout_everywhere(self, api: httpx.AsyncClient) -> None:
        email, _ = await register(api)
        a, b = await login(api, email), await login(api, email)
        response = await api.post(
            "/api/v1/auth/logout", json={"everywhere": True}, headers=bearer(a)
        )
        assert response.status_code == 204
        for tokens in (a, b):
            assert (await api.get("/api/v1/me", headers=bearer(tokens))).status_code == 401
        # Signing in again at once works, although tokens carry whole-second `iat`: the
        # cut-off is the logout's second, whose earlier tokens died with their sessions.
        fresh = await login(api, email)
        assert (await api.get("/api/v1/me", headers=bearer(fresh))).status_code == 200
        for tokens in (a, b):
            assert (await api.get("/api/v1/me", headers=bearer(tokens))).status_code == 401


class TestMfa:
    async def test_enrol_verify_then_login_needs_code(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        identity = identity_of(id_app)
        email, _ = await register(api)
        tokens = await login(api, email)
        setup = (await api.post("/api/v1/auth/mfa/setup", headers=bearer(tokens))).json()
        assert setup["provisioning_uri"].startswith("otpauth://totp/")
        assert len(setup["backup_codes"]) == 10
        code = identity.totp.now(setup["secret"])
        verified = await api.post(
            "/api/v1/auth/mfa/verify", json={"code": code}, headers=bearer(tokens)
        )
        assert verified.status_code == 200
        # The same code again is a replay.
        replay = await api.post(
            "/api/v1/auth/mfa/verify", json={"code": code}, headers=bearer(tokens)
        )
        assert replay.status_code == 401
        # Password alone no longer signs in.
        bare = await api.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert bare.status_code == 401
        assert bare.json()["mfa_required"] is True
        # A replayed TOTP code does not either; a backup code does, once.
        replayed = await api.post(
            "/api/v1/auth/login", json={"email": email, "password": PASSWORD, "otp": code}
        )
        assert replayed.status_code == 401
        backup = setup["backup_codes"][0]
        assert (await login(api, email, otp=backup))["access_token"]
        again = await api.post(
            "/api/v1/auth/login", json={"email": email, "password": PASSWORD, "otp": backup}
        )
        assert again.status_code == 401

    async def test_admin_routes_refuse_a_session_without_mfa(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        email = unique_email("admin")
        async with id_app.state.runtime.db.session() as session:
            await identity_service.register(
                session, id_app.state.runtime, email=email, password=PASSWORD, role="admin"
            )
        tokens = await login(api, email)
        _, user_id = await register(api)
        for method, path, body in (
            ("GET", "/api/admin/audit-log", None),
            ("PUT", f"/api/admin/users/{user_id}/plan", {"plan": "pro"}),
            ("POST", "/api/v1/privileges/batch", {"user_ids": [user_id]}),
        ):
            response = await api.request(method, path, json=body, headers=bearer(tokens))
            assert response.status_code == 403, (path, response.text)
            assert response.headers["content-type"] == PROBLEM
            assert response.json()["mfa_required"] is True

    async def test_non_admin_with_mfa_is_refused(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        identity = identity_of(id_app)
        email, _ = await register(api)
        tokens = await login(api, email)
        secret = (await api.post("/api/v1/auth/mfa/setup", headers=bearer(tokens))).json()["secret"]
        token = (
            await api.post(
                "/api/v1/auth/mfa/verify",
                json={"code": identity.totp.now(secret)},
                headers=bearer(tokens),
            )
        ).json()["access_token"]
        response = await api.get("/api/admin/audit-log", headers=bearer(token))
        assert response.status_code == 403

    async def test_admin_with_mfa_passes_and_refresh_keeps_mfa(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        _, tokens, _ = await make_admin(id_app, api)
        assert (await api.get("/api/admin/audit-log", headers=bearer(tokens))).status_code == 200
        refreshed = (
            await api.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        ).json()
        assert (await api.get("/api/admin/audit-log", headers=bearer(refreshed))).status_code == 200


class TestRevocationAcrossProcesses:
    async def test_logout_reaches_another_process_memory(
        self, api: httpx.AsyncClient, id_settings: object
    ) -> None:
        """Another process (its own Runtime and Identity) answers from memory, and learns of
        a logout made here through pub/sub, before any request could race it in practice."""
        from surge.identity.runtime import install_identity
        from surge.kit.runtime import Runtime
        from surge.kit.security import InvalidToken

        other_runtime = Runtime(id_settings)  # type: ignore[arg-type]
        await other_runtime.start()
        other = install_identity(other_runtime)
        await other.start(warm=False, refresh_view=False)
        try:
            await asyncio.wait_for(other.revocations.wait_trusted(), 5)
            email, _ = await register(api)
            tokens = await login(api, email)
            await other.authenticate(tokens["access_token"])
            assert (
                await api.post("/api/v1/auth/logout", headers=bearer(tokens))
            ).status_code == 204

            async def refused() -> bool:
                try:
                    await other.authenticate(tokens["access_token"])
                except InvalidToken:
                    return True
                return False

            await eventually(refused, timeout=0.5, interval=0.005, message="logout not heard")
            assert other.revocations.trusted  # answered from memory, not a fallback
        finally:
            await other.close()
            await other_runtime.stop()

    async def test_a_process_subscribing_after_a_logout_does_not_trust_a_lagging_replica(
        self, api: httpx.AsyncClient, id_settings: Settings, lagging_replica_url: str
    ) -> None:
        """ADR 0060: a process that subscribes after a logout was published learns of it
        from the database only, then trusts its memory. Its replica has replayed none of the
        suite's writes: the load must read the primary, or the revoked token passes."""
        from surge.identity.runtime import install_identity
        from surge.kit.runtime import Runtime
        from surge.kit.security import InvalidToken

        email, _ = await register(api)
        tokens = await login(api, email)
        assert (await api.post("/api/v1/auth/logout", headers=bearer(tokens))).status_code == 204
        settings = id_settings.model_copy(update={"DATABASE_REPLICA_URLS": [lagging_replica_url]})
        other_runtime = Runtime(settings)
        await other_runtime.start()
        other = install_identity(other_runtime)
        await other.start(warm=False, refresh_view=False)
        try:
            await asyncio.wait_for(other.revocations.wait_trusted(), 5)
            with pytest.raises(InvalidToken):
                await other.authenticate(tokens["access_token"])
            assert other.revocations.trusted  # answered from memory, not a fallback
        finally:
            await other.close()
            await other_runtime.stop()


class _Recorder:
    """Stands in for a module's structlog logger and keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = []

    def __getattr__(self, method: str) -> object:
        def record(*args: object, **kwargs: object) -> None:
            self.calls.append((method, args, kwargs))

        return record


class TestSecretsStayOutOfLogs:
    async def test_no_password_or_token_in_any_log_call(
        self, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every logger of the identity package is replaced by a recorder for the flows that
        handle secrets (the kit's redaction processor is a second line, not the first)."""
        import surge.identity.deps
        import surge.identity.privileges
        import surge.identity.security
        import surge.identity.service

        recorder = _Recorder()
        for module in (
            surge.identity.service, surge.identity.security,
            surge.identity.privileges, surge.identity.deps,
        ):  # fmt: skip
            monkeypatch.setattr(module, "log", recorder)
        email, _ = await register(api)
        await api.post("/api/v1/auth/login", json={"email": email, "password": "wrong-pw-1"})
        tokens = await login(api, email)
        rotated = (
            await api.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        ).json()
        await api.post(  # reuse: logged as a warning
            "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        await api.post("/api/v1/auth/logout", headers=bearer(rotated))
        logged = repr(recorder.calls)
        assert "identity.login.failed" in logged  # the recorder did see the flows
        assert "identity.refresh.reuse_detected" in logged
        for secret in (
            PASSWORD, "wrong-pw-1", tokens["access_token"], tokens["refresh_token"],
            rotated["access_token"], rotated["refresh_token"],
        ):  # fmt: skip
            assert secret not in logged


class TestWarming:
    async def test_most_active_users_are_loaded_at_start(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        email, user_id = await register(api)
        await login(api, email)  # the most recently active user now
        store = identity_of(id_app).privileges
        store.forget_all_local()
        assert 1 <= await store.warm(10) <= 10

        assert (await store.get(uuid.UUID(user_id))).source == "memory"


class TestEveryAdminRoute:
    async def test_every_admin_route_needs_an_admin_session_with_mfa(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """All of ``/api/admin/*`` in the assembled app (identity's, and the jobs, breaker,
        wallet and platform-health routers other modules mount with ``require_admin_mfa``)."""
        import re

        email = unique_email("admin")
        async with id_app.state.runtime.db.session() as session:
            await identity_service.register(
                session, id_app.state.runtime, email=email, password=PASSWORD, role="admin"
            )
        no_mfa = await login(api, email)
        user_email, _ = await register(api)
        plain_user = await login(api, user_email)
        checked = []
        # The OpenAPI document lists every route, nested routers included.
        for template, operations in id_app.openapi()["paths"].items():
            if not template.startswith("/api/admin"):
                continue
            path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), template)
            for method in sorted(m.upper() for m in operations):
                anonymous = await api.request(method, path)
                assert anonymous.status_code == 401, (method, template)
                user = await api.request(method, path, headers=bearer(plain_user))
                assert user.status_code == 403, (method, template)
                admin = await api.request(method, path, headers=bearer(no_mfa))
                assert admin.status_code == 403, (method, template, admin.text)
                assert admin.json().get("mfa_required") is True
                checked.append(f"{method} {template}")
        assert "PUT /api/admin/users/{user_id}/plan" in checked
        assert len(checked) >= 5
