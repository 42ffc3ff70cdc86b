"""Releasing a reviewed operation gives the reseller its money back on an administrator's
word: above ``APPROVAL_THRESHOLD`` a second administrator must approve it (ADR 0059)."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from surge.operations.service import operations as operations_service
from surge.wallet.funds import funds as funds_service
from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import Caller, bearer, make_admin


async def in_review(app: FastAPI, owner: UUID) -> UUID:
    runtime = runtime_of(app)
    async with runtime.db.session() as session:
        operation = await operations_service.create(
            session, runtime, owner, kind="signal", card="4111111111111111"
        )
    async with runtime.db.session() as session:
        await session.execute(
            text("UPDATE operations SET status = 'needs_review', sent_at = now() WHERE id = :i"),
            {"i": operation.id},
        )
        await session.execute(
            text("DELETE FROM jobs WHERE dedup_key = :k"), {"k": f"op:{operation.id}"}
        )
    return operation.id


async def available(app: FastAPI, owner: UUID) -> int:
    runtime = runtime_of(app)
    async with runtime.db.session() as session:
        return await funds_service.available(
            session, owner, currency=runtime.settings.WALLET_CURRENCY
        )


@pytest.mark.parametrize("ops_overrides", [{"APPROVAL_THRESHOLD": 0}])
async def test_a_release_waits_for_a_second_administrator(
    ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, admin: Caller,
    ops_overrides: dict[str, Any],
) -> None:  # fmt: skip
    operation_id = await in_review(ops_app, reseller.id)
    before = await available(ops_app, reseller.id)
    path = f"/api/admin/operations/{operation_id}/resolve"
    asked = await api.post(path, json={"performed": False}, headers=admin.headers)
    assert asked.status_code == 202, asked.text
    assert await available(ops_app, reseller.id) == before  # nothing released yet
    approval_id = asked.json()["approval"]["id"]
    own = await api.post(f"/api/admin/approvals/{approval_id}/approve", headers=admin.headers)
    assert own.status_code == 403, own.text
    _, tokens, _ = await make_admin(ops_app, api)
    checker = Caller(id=uuid4(), headers=bearer(tokens))
    done = await api.post(f"/api/admin/approvals/{approval_id}/approve", headers=checker.headers)
    assert done.status_code == 200, done.text
    assert done.json()["result"] == {"status": "failed"}
    assert await available(ops_app, reseller.id) > before  # the reservation came back
    settled = await in_review(ops_app, reseller.id)  # settling charges the reseller: no wait
    charged = await api.post(
        f"/api/admin/operations/{settled}/resolve", json={"performed": True},
        headers=admin.headers,
    )  # fmt: skip
    assert charged.status_code == 200, charged.text
