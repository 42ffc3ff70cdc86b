"""The free users' snapshot (ADR 0050): "free" from memory for users who never had a
subscription, and never for a paying user — against the session's real servers."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from surge.identity import repository
from surge.identity.free_users import FreeUsers
from surge.identity.privileges import PrivilegeStore
from surge.kit.telemetry.metrics import flush_all
from tests.fixtures.factories import bearer, identity_of, make_admin, register
from tests.fixtures.waiting import eventually


def _store(app: FastAPI) -> PrivilegeStore:
    store = identity_of(app).privileges
    assert store.free_users is not None  # on by default (IDENTITY_FREE_SNAPSHOT)
    return store


def _snapshot(store: PrivilegeStore) -> Callable[[], Awaitable[bytes]]:
    async def snapshot() -> bytes:
        async with store.db.session() as session:
            return await repository.free_user_ids(session)

    return snapshot


def _free(store: PrivilegeStore) -> FreeUsers:
    assert store.free_users is not None
    return store.free_users


async def _retake(store: PrivilegeStore) -> None:
    """A new snapshot, trusted: the echoes of this test's own invalidations (unread on the
    pub/sub socket for a moment) read, as the memory tier waits for them too."""
    free_users = store.free_users
    assert free_users is not None
    assert await free_users.rebuild(_snapshot(store))
    await eventually(lambda: free_users.trusted, message="an invalidation never read")


async def _a_free_user_in_the_snapshot(
    api: httpx.AsyncClient, app: FastAPI
) -> tuple[uuid.UUID, str, PrivilegeStore, FreeUsers]:
    """A user who never subscribed, registered and then found in a freshly taken snapshot."""
    _, user_id = await register(api)
    uid = uuid.UUID(user_id)
    store = _store(app)
    free_users = _free(store)
    await _retake(store)
    assert free_users.is_free(uid, user_id)
    return uid, user_id, store, free_users


def _snapshot_answers() -> float:
    flush_all()
    return sum(
        REGISTRY.get_sample_value("surge_privilege_snapshot_answers_total", {"kind": k}) or 0.0
        for k in ("own", "batch")
    )


async def _set_plan(api: httpx.AsyncClient, admin: dict[str, str], user_id: str, plan: str) -> None:
    response = await api.put(
        f"/api/admin/users/{user_id}/plan", json={"plan": plan}, headers=bearer(admin)
    )
    assert response.status_code == 204, response.text


async def test_free_users_are_answered_from_memory_and_paying_ones_from_their_plan(
    api: httpx.AsyncClient, id_app: FastAPI
) -> None:
    _, admin, _ = await make_admin(id_app, api)
    free, paying = [uuid.UUID((await register(api))[1]) for _ in range(2)]
    await _set_plan(api, admin, str(paying), "pro")
    store = _store(id_app)
    await _retake(store)
    store.forget_all_local()
    before = _snapshot_answers()
    mine = await store.get(free)
    assert (mine.plan, mine.source, mine.found) == ("free", "memory", True)
    assert store.peek(free) is mine  # the hot path's memo holds it too
    found = await store.get_many([free, paying, uuid.uuid4()])
    assert (found[free].plan, found[free].source) == ("free", "memory")
    # The paying user is not in the snapshot: their plan comes from the tiers.
    assert (found[paying].plan, found[paying].source) == ("pro", "database")
    unknown = next(p for u, p in found.items() if u not in (free, paying))
    assert not unknown.found  # an id nobody has is not "free", it is unknown
    assert _snapshot_answers() - before == 3  # get, peek, and one in the batch


async def test_a_plan_change_is_seen_at_once_and_never_answered_free(
    api: httpx.AsyncClient, id_app: FastAPI
) -> None:
    _, admin, _ = await make_admin(id_app, api)
    user_id = uuid.UUID((await register(api))[1])
    store = _store(id_app)
    await _retake(store)
    assert (await store.get(user_id)).source == "memory"
    await _set_plan(api, admin, str(user_id), "ultra")
    # In the snapshot still, but invalidated at commit: never again answered from it.
    assert store.peek(user_id) is None
    assert (await store.get(user_id)).plan == "ultra"
    assert (await store.get_many([user_id]))[user_id].plan == "ultra"


async def test_a_plan_change_committed_while_the_snapshot_is_taken_is_not_lost(
    api: httpx.AsyncClient, id_app: FastAPI
) -> None:
    """The snapshot's query sees the user as free; the plan change commits (and invalidates)
    before the snapshot is installed: the user must be answered from their plan."""
    _, admin, _ = await make_admin(id_app, api)
    user_id = uuid.UUID((await register(api))[1])
    store = _store(id_app)
    assert store.free_users is not None
    taken = _snapshot(store)

    async def racing() -> bytes:
        blob = await taken()
        assert user_id.bytes in blob  # taken before the change: the user is free in it
        await _set_plan(api, admin, str(user_id), "plus")
        return blob

    assert await store.free_users.rebuild(racing)
    answer = await store.get(user_id)
    assert (answer.plan, answer.source) == ("plus", "database")


async def test_a_plan_change_in_another_process_is_heard_by_its_snapshot(
    api: httpx.AsyncClient, id_app: FastAPI, id_settings: object
) -> None:
    from surge.identity.runtime import install_identity
    from surge.kit.runtime import Runtime

    _, admin, _ = await make_admin(id_app, api)
    user_id = uuid.UUID((await register(api))[1])
    other_runtime = Runtime(id_settings)  # type: ignore[arg-type]
    await other_runtime.start()
    other = install_identity(other_runtime)
    await other.start(refresh_view=False)  # warms: takes its own snapshot
    try:
        free_users = other.privileges.free_users
        assert free_users is not None
        await eventually(lambda: free_users.trusted, message="no snapshot taken at start")
        assert (await other.privileges.get(user_id)).source == "memory"
        await _set_plan(api, admin, str(user_id), "pro")

        async def pro() -> bool:
            return (await other.privileges.get(user_id)).plan == "pro"

        await eventually(pro, timeout=1.0, interval=0.01, message="plan change not heard")
    finally:
        await other.close()
        await other_runtime.stop()


async def test_after_a_possibly_missed_invalidation_the_snapshot_answers_nobody(
    api: httpx.AsyncClient, id_app: FastAPI
) -> None:
    uid, user_id, store, free_users = await _a_free_user_in_the_snapshot(api, id_app)
    await store.cache.clear()  # the cache's own flush: whatever the snapshot knew is suspect
    assert not free_users.trusted
    assert free_users.stale()
    assert not free_users.is_free(uid, user_id)
    assert await store.refresh_free_users()  # what the process's loop does within seconds
    await eventually(lambda: free_users.trusted)
    assert free_users.is_free(uid, user_id)


async def test_an_invalidation_waiting_unread_stops_the_snapshot_answering(
    api: httpx.AsyncClient, id_app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lagging event loop: another process's plan change sits unread on the pub/sub
    socket. The memory tier defers to Redis then (ADR 0028); the snapshot must too, or the
    follow-up read of a write (seed003_writes's read-back) is answered "free"."""
    uid, user_id, store, free_users = await _a_free_user_in_the_snapshot(api, id_app)
    monkeypatch.setattr(store.cache.l1, "suspect", lambda: True)  # bytes unread on the socket
    assert not free_users.is_free(uid, user_id)
    assert (await store.get(uid)).source != "memory"
    assert not free_users.stale()  # still current: answered again once read
    monkeypatch.setattr(store.cache.l1, "suspect", lambda: False)
    assert free_users.is_free(uid, user_id)


async def test_too_many_invalidations_end_the_snapshot_until_retaken(
    api: httpx.AsyncClient, id_app: FastAPI
) -> None:
    _, user_id = await register(api)
    uid = uuid.UUID(user_id)
    store = _store(id_app)
    free_users = FreeUsers(store.cache, max_dirty=6)  # a second one on the same cache
    assert await free_users.rebuild(_snapshot(store))
    for _ in range(4):
        await store.invalidate(uuid.uuid4())
    assert free_users.stale()  # retaken early: dirty ids are a cost on every lookup
    # (Each invalidation's own echo sits unread on the socket for a moment: not trusted.)
    await eventually(lambda: free_users.trusted, message="the echo was never read")
    assert free_users.is_free(uid, user_id)
    for _ in range(3):
        await store.invalidate(uuid.uuid4())
    assert not free_users.trusted
    assert not free_users.is_free(uid, user_id)
    assert await free_users.rebuild(_snapshot(store))
    assert free_users.is_free(uid, user_id)
