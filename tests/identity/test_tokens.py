"""RFC 8725: every malformed or foreign access token is a 401 problem+json, for the right
reason (each test keeps a real, live session and changes one property of the token)."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI

from surge.config import Settings
from surge.kit.security import KeyRing, TokenCodec
from tests.fixtures.clients import app_client
from tests.fixtures.factories import bearer, identity_of, identity_settings, login, register

OLD_KEY = "old-key-0123456789abcdef0123456789abcdef"
NEW_KEY = "new-key-0123456789abcdef0123456789abcdef"
PROBLEM = "application/problem+json"


async def _live_claims(api: httpx.AsyncClient, app: FastAPI) -> dict[str, Any]:
    email, _ = await register(api)
    tokens = await login(api, email)
    claims = identity_of(app).codec.verify(tokens["access_token"])
    return {"sid": claims["sid"], "role": "user", "mfa": False, "sub": claims["sub"]}


async def _assert_401(api: httpx.AsyncClient, token: str, reason: str) -> None:
    response = await api.get("/api/v1/me", headers=bearer(token))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert reason in response.json()["detail"]


class TestRejectedTokens:
    async def test_valid_token_is_accepted(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        claims = await _live_claims(api, id_app)
        codec = identity_of(id_app).codec
        token = codec.issue(claims.pop("sub"), claims)
        assert (await api.get("/api/v1/me", headers=bearer(token))).status_code == 200

    async def test_alg_none(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        claims = await _live_claims(api, id_app)
        codec = identity_of(id_app).codec
        payload = jwt.decode(
            codec.issue(claims.pop("sub"), claims), options={"verify_signature": False}
        )
        # "" (not None): with `cryptography` installed pyjwt types the key as non-optional.
        forged = jwt.encode(payload, "", algorithm="none", headers={"kid": "k0", "typ": "at+jwt"})
        await _assert_401(api, forged, "algorithm")

    async def test_alg_confusion_hs512(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        claims = await _live_claims(api, id_app)
        codec = identity_of(id_app).codec
        kid, key = codec.ring.current
        payload = jwt.decode(
            codec.issue(claims.pop("sub"), claims), options={"verify_signature": False}
        )
        other = jwt.encode(payload, key, algorithm="HS512", headers={"kid": kid, "typ": "at+jwt"})
        await _assert_401(api, other, "algorithm")

    async def test_tampered_signature(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        claims = await _live_claims(api, id_app)
        token = identity_of(id_app).codec.issue(claims.pop("sub"), claims)
        head, body, signature = token.split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
        raw[0] ^= 0x01
        bad = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
        await _assert_401(api, f"{head}.{body}.{bad}", "Invalid")

    async def test_tampered_payload(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        claims = await _live_claims(api, id_app)
        token = identity_of(id_app).codec.issue(claims.pop("sub"), claims)
        head, _body, signature = token.split(".")
        payload = jwt.decode(token, options={"verify_signature": False})
        payload["role"] = "admin"
        import orjson

        forged_body = base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("=")
        await _assert_401(api, f"{head}.{forged_body}.{signature}", "Invalid")

    async def test_expired(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        claims = await _live_claims(api, id_app)
        token = identity_of(id_app).codec.issue(
            claims.pop("sub"), claims, now=time.time() - 16 * 60
        )
        await _assert_401(api, token, "expired")

    async def test_wrong_audience_and_issuer(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        claims = await _live_claims(api, id_app)
        subject = claims.pop("sub")
        ours = identity_of(id_app).codec
        for issuer, audience in (("surge", "another-api"), ("someone-else", "surge-api")):
            foreign = TokenCodec(ours.ring, issuer=issuer, audience=audience, ttl=900)
            await _assert_401(api, foreign.issue(subject, claims), "Invalid")

    async def test_wrong_type(self, api: httpx.AsyncClient, id_app: FastAPI) -> None:
        claims = await _live_claims(api, id_app)
        codec = identity_of(id_app).codec
        kid, key = codec.ring.current
        payload = jwt.decode(
            codec.issue(claims.pop("sub"), claims), options={"verify_signature": False}
        )
        token = jwt.encode(payload, key, algorithm="HS256", headers={"kid": kid, "typ": "JWT"})
        await _assert_401(api, token, "Not an access token")

    async def test_garbage(self, api: httpx.AsyncClient) -> None:
        await _assert_401(api, "not.a.jwt", "Malformed")

    async def test_hostile_kid(self, api: httpx.AsyncClient) -> None:
        """A kid is the client's input: non-ASCII, a lone surrogate or a number is 401,
        never 500 (compare_digest raises on non-ASCII str)."""
        for kid in ("\u00e9", "\ud800", "k0" * 500):
            token = jwt.encode(
                {"sub": "x"}, "k" * 32, algorithm="HS256", headers={"kid": kid, "typ": "at+jwt"}
            )
            await _assert_401(api, token, "")
        header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"at+jwt","kid":7}').rstrip(b"=")
        await _assert_401(api, f"{header.decode()}.e30.c2ln", "")  # PyJWT won't write it


@pytest.fixture
async def rotated(server_urls: tuple[str, str]) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app whose ring is ``new`` (signing) + ``old`` (verify only)."""
    from surge.app import create_app

    settings: Settings = identity_settings(
        *server_urls, AUTH_SIGNING_KEYS=f"new={NEW_KEY},old={OLD_KEY}"
    )
    app = create_app(settings)
    async for client in app_client(app):
        yield app, client


class TestKeyRotation:
    async def test_old_key_still_verifies_during_rotation(
        self, rotated: tuple[FastAPI, httpx.AsyncClient]
    ) -> None:
        app, api = rotated
        claims = await _live_claims(api, app)
        assert identity_of(app).codec.ring.current[0] == "new"
        old_codec = TokenCodec(
            KeyRing.parse(f"old={OLD_KEY}"), issuer="surge", audience="surge-api", ttl=900
        )
        token = old_codec.issue(claims.pop("sub"), claims)
        assert (await api.get("/api/v1/me", headers=bearer(token))).status_code == 200

    async def test_rotated_out_key_is_refused(
        self, rotated: tuple[FastAPI, httpx.AsyncClient], server_urls: tuple[str, str]
    ) -> None:
        app, api = rotated
        claims = await _live_claims(api, app)
        retired = TokenCodec(
            KeyRing.parse(f"retired={OLD_KEY}"), issuer="surge", audience="surge-api", ttl=900
        )
        await _assert_401(api, retired.issue(claims.pop("sub"), claims), "unknown key")

    async def test_same_kid_other_secret_is_refused(
        self, rotated: tuple[FastAPI, httpx.AsyncClient]
    ) -> None:
        app, api = rotated
        claims = await _live_claims(api, app)
        impostor = TokenCodec(
            KeyRing.parse("new=impostor-0123456789abcdef0123456789abcdef"),
            issuer="surge",
            audience="surge-api",
            ttl=900,
        )
        await _assert_401(api, impostor.issue(claims.pop("sub"), claims), "Invalid")


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="shorter"):
        KeyRing.parse("k=short")
