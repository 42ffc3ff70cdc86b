"""The console's operations page (issue 12): operations in review are listed with the two
decisions, each confirmed first, then settled or released once and audited."""

from __future__ import annotations

from uuid import UUID

import httpx
from fastapi import FastAPI

from surge.operations.service import operations as operations_service
from tests.admin.test_console import audit_rows, signed_in
from tests.admin.test_console_money import form_key_of
from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import Caller
from tests.fixtures.provider import control
from tests.operations.conftest import World, submit
from tests.operations.test_hostile import transfers


async def _in_review(app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World) -> str:
    """An operation whose call may have reached the provider, with no way to tell."""
    await control(world.provider.url, "/_control/config", {"drop_rate": 1.0, "history_down": True})
    op = (await submit(api, reseller)).json()
    runtime = runtime_of(app)
    async with runtime.db.session() as session:
        status = await operations_service.run(
            session, runtime, UUID(op["id"]), attempt=3, last=True
        )
    assert status == "needs_review"
    await control(world.provider.url, "/_control/config", {"drop_rate": 0.0, "history_down": False})
    return str(op["id"])


async def test_review_queue_shows_the_operation_and_release_is_confirmed_then_audited(
    ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
) -> None:
    operation_id = await _in_review(ops_app, api, reseller, world)
    csrf = await signed_in(ops_app, api)
    queue = await api.get("/admin/operations")
    assert queue.status_code == 200
    assert operation_id in queue.text
    assert f"resolve-yes-{operation_id}" in queue.text
    assert f"resolve-no-{operation_id}" in queue.text
    path = f"/admin/operations/{operation_id}/resolve"
    fields = {"csrf": csrf, "performed": "no", "note": "not in the card's history"}
    asked = await api.post(path, data=fields)
    assert 'id="confirm"' in asked.text
    assert await transfers(ops_app, operation_id) == [("reserve", "pending")]  # nothing yet
    confirmed = {**fields, "confirm": "yes", "form_key": form_key_of(asked.text)}
    done = await api.post(path, data=confirmed, headers={"X-Request-ID": "r1"})
    assert done.status_code == 303, done.text
    # The same rendered form submitted again (a double click): the same answer, nothing more.
    twice = await api.post(path, data=confirmed)
    assert twice.status_code == 303, twice.text
    assert await transfers(ops_app, operation_id) == [("reserve", "pending"), ("release", "void")]
    [row] = await audit_rows(ops_app, "operations.operation.resolve", operation_id)
    assert row["after"] == {"status": "failed", "performed": False,
                            "note": "not in the card's history"}  # fmt: skip
    assert row["request_id"] == "r1"
    assert row["actor_id"] is not None
    assert f"resolve-no-{operation_id}" not in (await api.get("/admin/operations")).text
    # Decided once: the other decision is refused, and moves no money.
    other = {**fields, "performed": "yes"}
    asked_again = await api.post(path, data=other)
    again = await api.post(
        path, data={**other, "confirm": "yes", "form_key": form_key_of(asked_again.text)}
    )
    assert again.status_code == 409
    assert await transfers(ops_app, operation_id) == [("reserve", "pending"), ("release", "void")]


async def test_an_unknown_decision_is_refused(
    ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
) -> None:
    operation_id = await _in_review(ops_app, api, reseller, world)
    csrf = await signed_in(ops_app, api)
    refused = await api.post(
        f"/admin/operations/{operation_id}/resolve",
        data={"csrf": csrf, "performed": "maybe", "confirm": "yes"},
    )
    assert refused.status_code == 422
    assert await transfers(ops_app, operation_id) == [("reserve", "pending")]
    # A confirmed decision without its rendered form's key is refused too, before any money.
    keyless = await api.post(
        f"/admin/operations/{operation_id}/resolve",
        data={"csrf": csrf, "performed": "no", "confirm": "yes"},
    )
    assert keyless.status_code == 428
    assert await transfers(ops_app, operation_id) == [("reserve", "pending")]
