"""The login lock-out is not a denial of service (ADR 0044): OWASP's device cookies.

Anyone who knows an address can spend its account-wide failure budget from many addresses.
Each test drives the real app on real Redis and PostgreSQL: the owner on a device that
signed in before keeps signing in; a client without a trusted device token is still
locked out; an attacker cannot forge a device token nor reuse another account's; a stolen
one buys only its own small budget; "log out everywhere" and a password reset revoke them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pyotp
from fastapi import FastAPI
from pydantic import SecretStr

from surge.admin.console.session import COOKIE
from surge.identity.devices import DEVICE_COOKIE, DeviceTokens
from surge.identity.security import LoginGuard
from surge.kit.security import hash_token, new_opaque_token
from surge.models.password_reset import PasswordResetToken
from tests.admin.test_console import new_user, sign_in
from tests.fixtures.factories import (
    PASSWORD,
    bearer,
    identity_of,
    make_admin,
    register,
)

LOGIN = "/api/v1/auth/login"
WRONG = "wrong-guess-123"


def tight(app: FastAPI, *, account: int = 3, device: int = 3) -> LoginGuard:
    guard = identity_of(app).login_guard
    guard.max_per_account, guard.max_per_device, guard.max_per_ip = account, device, 1_000
    return guard


def an_ip() -> str:
    """A client address of its own (the ASGI peer is a trusted proxy: X-Forwarded-For counts)."""
    return f"198.18.{uuid.uuid4().int % 250 + 1}.{uuid.uuid4().int % 250 + 1}"


@asynccontextmanager
async def browser(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Another client of the same app, with a cookie jar of its own (empty: untrusted)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def attempt(
    app: FastAPI,
    email: str,
    password: str = PASSWORD,
    *,
    device_token: str | None = None,
    otp: str | None = None,
) -> httpx.Response:
    """One sign-in from a fresh client (no cookie) at an address of its own."""
    body: dict[str, Any] = {"email": email, "password": password}
    if device_token is not None:
        body["device_token"] = device_token
    if otp is not None:
        body["otp"] = otp
    async with browser(app) as client:
        return await client.post(LOGIN, json=body, headers={"X-Forwarded-For": an_ip()})


async def burn(app: FastAPI, email: str, guesses: int) -> list[int]:
    """The attacker: wrong passwords for ``email``, each from another address."""
    return [(await attempt(app, email, WRONG)).status_code for _ in range(guesses)]


async def signed_in_device(app: FastAPI, email: str) -> str:
    response = await attempt(app, email)
    assert response.status_code == 200, response.text
    token = response.json()["device_token"]
    assert isinstance(token, str)
    assert token
    return token


class TestOwnerOnATrustedDevice:
    async def test_an_attacker_on_many_addresses_cannot_lock_out_the_owner(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        tight(id_app, account=3)
        email, _ = await register(api)
        device = await signed_in_device(id_app, email)
        assert await burn(id_app, email, 6) == [401, 401, 401, 429, 429, 429]
        # A client without a trusted token is locked out, the right password or not ...
        assert (await attempt(id_app, email)).status_code == 429
        # ... the owner's device is judged by its own budget, untouched by the attack.
        owner = await attempt(id_app, email, device_token=device)
        assert owner.status_code == 200, owner.text
        assert (await api.get("/api/v1/me", headers=bearer(owner.json()))).status_code == 200
        # The owner's sign-in did not hand the attacker a fresh account budget.
        assert await burn(id_app, email, 1) == [429]
        assert (await attempt(id_app, email)).status_code == 429

    async def test_a_browser_keeps_its_device_token_in_a_cookie_for_the_sign_in_only(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """The panel (a page calling the JSON API) needs no code of its own: the sign-in
        answer sets an HttpOnly cookie that only the sign-in endpoint receives back."""
        tight(id_app, account=3)
        email, _ = await register(api)
        async with browser(id_app) as owner:
            first = await owner.post(LOGIN, json={"email": email, "password": PASSWORD})
            assert first.status_code == 200
            set_cookie = first.headers["set-cookie"]
            assert set_cookie.startswith(f"{DEVICE_COOKIE}={first.json()['device_token']};")
            for attribute in ("HttpOnly", "Path=/api/v1/auth/login", "SameSite=strict"):
                assert attribute in set_cookie, set_cookie
            await burn(id_app, email, 4)
            again = await owner.post(LOGIN, json={"email": email, "password": PASSWORD})
            assert again.status_code == 200, again.text
            # Each sign-in is a new device token (a new device id).
            assert again.json()["device_token"] != first.json()["device_token"]

    async def test_a_trusted_device_still_needs_the_second_factor(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        """The token only chooses which failure budget counts; it vouches for nothing."""
        email, _, secret = await make_admin(id_app, api)  # signed in with ``api``: trusted
        tight(id_app, account=3)
        await burn(id_app, email, 4)
        prompt = await api.post(LOGIN, json={"email": email, "password": PASSWORD})
        assert prompt.status_code == 401
        assert prompt.json()["mfa_required"] is True
        # make_admin spent this time step's code: the next step's (±1 step is accepted).
        otp = pyotp.TOTP(secret).at(time.time() + 30)
        untrusted = await attempt(id_app, email, otp=otp)
        assert untrusted.status_code == 429
        signed = await api.post(LOGIN, json={"email": email, "password": PASSWORD, "otp": otp})
        assert signed.status_code == 200, signed.text
        assert signed.json()["access_token"]

    async def test_the_console_remembers_the_browser(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        tight(id_app, account=3)
        email, secret = await new_user(id_app, "admin", mfa=True)
        assert secret is not None
        totp = pyotp.TOTP(secret)
        first = await sign_in(api, email, totp.now())
        assert first.status_code == 303, first.text
        device_cookie = [c for c in first.headers.get_list("set-cookie") if DEVICE_COOKIE in c]
        assert len(device_cookie) == 1
        assert "Path=/admin/login" in device_cookie[0]
        await burn(id_app, email, 4)  # through the JSON API: one account, one budget
        async with browser(id_app) as stranger:
            refused = await sign_in(stranger, email, totp.at(time.time() + 30))
            assert refused.status_code == 429
        api.cookies.delete(COOKIE)  # signed out of the console; the device cookie stays
        again = await sign_in(api, email, totp.at(time.time() + 30))
        assert again.status_code == 303, again.text
        assert again.headers["location"] == "/admin/overview"


class TestUntrustedClients:
    async def test_are_locked_out_after_the_account_budget(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        tight(id_app, account=3)
        email, _ = await register(api)
        assert await burn(id_app, email, 3) == [401, 401, 401]
        locked = await attempt(id_app, email)
        assert locked.status_code == 429
        assert int(locked.headers["retry-after"]) >= 1
        assert locked.headers["content-type"] == "application/problem+json"

    async def test_garbage_in_the_field_is_an_untrusted_client_not_an_error(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        tight(id_app, account=3)
        email, _ = await register(api)
        ok = await attempt(id_app, email, device_token="not-a-token")
        assert ok.status_code == 200
        await burn(id_app, email, 3)
        assert (await attempt(id_app, email, device_token="not-a-token")).status_code == 429
        too_long = await attempt(id_app, email, device_token="x" * 5_000)
        assert too_long.status_code == 422


class TestForgedOrForeignTokens:
    async def test_another_accounts_token_does_not_open_the_victims_budget(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        tight(id_app, account=3)
        attacker, _ = await register(api)
        victim, _ = await register(api)
        own = await signed_in_device(id_app, attacker)
        # Guesses with the attacker's genuine token count against the victim's account ...
        guesses = [
            (await attempt(id_app, victim, WRONG, device_token=own)).status_code for _ in range(5)
        ]
        assert guesses == [401, 401, 401, 429, 429]
        # ... and even the right password does not pass with it.
        assert (await attempt(id_app, victim, device_token=own)).status_code == 429
        # The attacker's own account was not touched.
        assert (await attempt(id_app, attacker, device_token=own)).status_code == 200

    async def test_forgeries_are_untrusted(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        tight(id_app, account=3)
        email, user_id = await register(api)
        genuine = await signed_in_device(id_app, email)
        await burn(id_app, email, 3)
        head, payload, signature = genuine.split(".")
        middle = len(signature) // 2
        flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B")
        flipped += signature[middle + 1 :]
        settings = id_app.state.runtime.settings
        other_key = settings.model_copy(
            update={"SECRET_KEY": SecretStr("another-deployment-" + uuid.uuid4().hex)}
        )
        expired_codec = identity_of(id_app).devices.codec
        claims = {"gen": 0}
        forgeries = {
            "signature altered": f"{head}.{payload}.{flipped}",
            "another secret": DeviceTokens(other_key).issue(uuid.UUID(user_id), None),
            "alg none": jwt.encode(
                {
                    "sub": user_id,
                    "gen": 0,
                    "jti": uuid.uuid4().hex,
                    "iss": "surge",
                    "aud": "surge-api",
                    "iat": int(time.time()),
                    "exp": int(time.time()) + 600,
                },
                key="",
                algorithm="none",
                headers={"typ": "device+jwt", "kid": "d0"},
            ),
            "expired": expired_codec.issue(
                user_id, claims, now=time.time() - settings.AUTH_DEVICE_TTL.total_seconds() - 60
            ),
            "an access token": identity_of(id_app).access_token(
                uuid.UUID(user_id), uuid.uuid4(), "user", False
            ),
        }
        for name, forged in forgeries.items():
            answer = await attempt(id_app, email, device_token=forged)
            assert answer.status_code == 429, name
        assert (await attempt(id_app, email, device_token=genuine)).status_code == 200

    async def test_a_device_token_is_not_an_access_token(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        email, _ = await register(api)
        device = await signed_in_device(id_app, email)
        assert (await api.get("/api/v1/me", headers=bearer(device))).status_code == 401


class TestAStolenToken:
    async def test_buys_only_its_own_small_budget_then_is_itself_locked_out(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        tight(id_app, account=3, device=2)
        email, _ = await register(api)
        stolen = await signed_in_device(id_app, email)
        guesses = [
            (await attempt(id_app, email, WRONG, device_token=stolen)).status_code for _ in range(4)
        ]
        assert guesses == [401, 401, 429, 429]
        # Spent, the token is locked out itself, whatever the password ...
        assert (await attempt(id_app, email, device_token=stolen)).status_code == 429
        # ... and its failures were not the account's: the owner signs in anywhere.
        fresh = await signed_in_device(id_app, email)
        assert (await attempt(id_app, email, device_token=fresh)).status_code == 200

    async def test_a_wrong_second_factor_counts_against_the_device(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        email, _, secret = await make_admin(id_app, api)
        tight(id_app, account=3, device=2)
        stolen = api.cookies.get(DEVICE_COOKIE)
        assert stolen
        replies = [
            (await attempt(id_app, email, device_token=stolen, otp="000000")).status_code
            for _ in range(3)
        ]
        assert replies == [401, 401, 429]
        otp = pyotp.TOTP(secret).at(time.time() + 30)
        assert (await attempt(id_app, email, device_token=stolen, otp=otp)).status_code == 429


class TestRevocation:
    async def test_log_out_everywhere_revokes_every_device_token(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        tight(id_app, account=3)
        email, _ = await register(api)
        before = await attempt(id_app, email)
        out = await api.post(
            "/api/v1/auth/logout", json={"everywhere": True}, headers=bearer(before.json())
        )
        assert out.status_code == 204
        after = await signed_in_device(id_app, email)
        await burn(id_app, email, 3)
        revoked = await attempt(id_app, email, device_token=before.json()["device_token"])
        assert revoked.status_code == 429
        assert (await attempt(id_app, email, device_token=after)).status_code == 200

    async def test_a_password_reset_revokes_every_device_token(
        self, api: httpx.AsyncClient, id_app: FastAPI
    ) -> None:
        tight(id_app, account=3)
        email, user_id = await register(api)
        before = await signed_in_device(id_app, email)
        raw = new_opaque_token()
        async with id_app.state.runtime.db.session() as session:
            session.add(PasswordResetToken(
                user_id=uuid.UUID(user_id), token_hash=hash_token(raw),
                expires_at=datetime.now(UTC) + timedelta(minutes=10),
            ))  # fmt: skip
            await session.commit()
        new_password = "a-brand-new-passphrase"
        reset = await api.post(
            "/api/v1/auth/password/reset", json={"token": raw, "password": new_password}
        )
        assert reset.status_code == 204, reset.text
        after = await attempt(id_app, email, new_password)
        assert after.status_code == 200
        await burn(id_app, email, 3)
        assert (await attempt(id_app, email, new_password, device_token=before)).status_code == 429
        trusted = await attempt(
            id_app, email, new_password, device_token=after.json()["device_token"]
        )
        assert trusted.status_code == 200
