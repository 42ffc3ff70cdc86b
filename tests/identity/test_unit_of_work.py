"""Identity in the caller's unit of work (ADR 0014): nothing is announced for a transaction
that rolled back; what commits is announced after the commit."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from surge.identity.principal import Principal
from surge.identity.runtime import identity_state
from surge.identity.service import identity as identity_service
from tests.fixtures.factories import login, register


class Boom(Exception):
    pass


async def _principal(id_app: FastAPI, api: httpx.AsyncClient) -> Principal:
    email, _ = await register(api)
    tokens = await login(api, email)
    return identity_state(id_app.state.runtime).principal_of(tokens["access_token"])


async def test_a_logout_that_rolls_back_is_never_announced(
    id_app: FastAPI, api: httpx.AsyncClient
) -> None:
    runtime = id_app.state.runtime
    state = identity_state(runtime)
    principal = await _principal(id_app, api)

    async def failing_request() -> None:
        async with runtime.db.session() as session:
            await identity_service.logout(session, runtime, principal)
            raise Boom  # the request fails after the service returned

    with pytest.raises(Boom):
        await failing_request()
    assert not await state.revocations.is_revoked(
        principal.session_id,
        principal.user_id,
        principal.issued_at,
    )
    async with runtime.db.session() as session:
        await identity_service.logout(session, runtime, principal)
        # Written, not yet committed: not announced yet either.
        assert state.revocations.revoked_now(
            principal.session_id,
            principal.user_id,
            principal.issued_at,
        ) in {False, None}
    assert await state.revocations.is_revoked(
        principal.session_id,
        principal.user_id,
        principal.issued_at,
    )


async def test_a_replayed_refresh_token_revokes_even_though_the_reply_is_401(
    id_app: FastAPI, api: httpx.AsyncClient
) -> None:
    """The one write that must outlive its error (``keep_on_error``)."""
    email, _ = await register(api)
    tokens = await login(api, email)
    first = await api.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert first.status_code == 200
    replay = await api.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert replay.status_code == 401
    # The session is revoked in PostgreSQL (committed) and announced: the new pair is dead too.
    me = await api.get(
        "/api/v1/me", headers={"Authorization": f"Bearer {first.json()['access_token']}"}
    )
    assert me.status_code == 401
    again = await api.post(
        "/api/v1/auth/refresh", json={"refresh_token": first.json()["refresh_token"]}
    )
    assert again.status_code == 401


async def test_login_runs_in_the_request_transaction(
    id_app: FastAPI, api: httpx.AsyncClient
) -> None:
    """A login whose unit of work rolls back leaves no session behind."""
    runtime = id_app.state.runtime
    email, _ = await register(api)
    pairs = []

    async def failing_request() -> None:
        async with runtime.db.session() as session:
            pairs.append(
                await identity_service.login(
                    session, runtime, email=email, password="correct horse battery staple"
                )
            )
            raise Boom

    with pytest.raises(Boom):
        await failing_request()
    pair = pairs[0]
    async with runtime.db.session() as session:
        found, _ = await identity_service.sessions_page(
            session,
            identity_state(runtime).principal_of(pair.access_token),
            limit=10,
            cursor=None,
        )
    assert found == []
