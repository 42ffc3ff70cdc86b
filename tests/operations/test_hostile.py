"""The provider misbehaves: lost replies, blocked proxies, bad accounts, status page down.
Each test checks the money as well as the status: paid once for work done, never for work
not done, the reservation left pending only in review."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from surge.operations.service import RetryLater
from surge.operations.service import operations as operations_service
from surge.sim.proxies import egress_address
from tests.fixtures.clients import runtime_of
from tests.fixtures.factories import Caller
from tests.fixtures.provider import control
from tests.operations.conftest import (
    World,
    ops_worker,
    submit,
    wait_decided,
)


async def transfers(app: FastAPI, operation_id: str) -> list[tuple[str, str]]:
    """(idempotency key, phase) of the ledger transfers of one operation."""
    async with runtime_of(app).db.session() as session:
        rows = await session.execute(
            text(
                "SELECT idempotency_key, phase FROM wallet_transfers "
                "WHERE idempotency_key LIKE :k ORDER BY id"
            ),
            {"k": f"op:{operation_id}:%"},
        )
        return [(r[0].rsplit(":", 1)[1], r[1]) for r in rows.all()]


def performed(state: dict[str, Any], operation_id: str) -> int:
    return sum(1 for p in state["performed"] if p["reference"] == operation_id)


class TestLostReply:
    async def test_dropped_reply_is_asked_not_resent(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
    ) -> None:
        await control(world.provider.url, "/_control/config", {"drop_rate": 1.0})
        op = (await submit(api, reseller)).json()
        async with ops_worker(runtime_of(ops_app)):
            done = await wait_decided(api, reseller, op["id"])
        assert done["status"] == "succeeded", done
        assert [a["outcome"] for a in done["attempts"]] == ["confirmed"]
        state = await control(world.provider.url, "/_control/state")
        assert performed(state, op["id"]) == 1
        assert await transfers(ops_app, op["id"]) == [("reserve", "pending"), ("settle", "post")]

    async def test_unknown_then_known_on_the_next_attempt(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
    ) -> None:
        await control(
            world.provider.url, "/_control/config", {"drop_rate": 1.0, "history_down": True}
        )
        op = (await submit(api, reseller)).json()
        runtime = runtime_of(ops_app)
        async with runtime.db.session() as session:
            with pytest.raises(RetryLater):
                await operations_service.run(
                    session, runtime, UUID(op["id"]), attempt=1, last=False
                )
        await control(
            world.provider.url, "/_control/config", {"drop_rate": 0.0, "history_down": False}
        )
        async with runtime.db.session() as session:
            status = await operations_service.run(
                session, runtime, UUID(op["id"]), attempt=2, last=False
            )
        assert status == "succeeded"
        state = await control(world.provider.url, "/_control/state")
        assert performed(state, op["id"]) == 1  # asked first: not renewed twice
        assert await transfers(ops_app, op["id"]) == [("reserve", "pending"), ("settle", "post")]

    async def test_cannot_tell_goes_to_review_then_admin_resolves(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, admin: Caller,
        world: World,
    ) -> None:  # fmt: skip
        await control(
            world.provider.url, "/_control/config", {"drop_rate": 1.0, "history_down": True}
        )
        op = (await submit(api, reseller)).json()
        runtime = runtime_of(ops_app)
        async with runtime.db.session() as session:
            status = await operations_service.run(
                session, runtime, UUID(op["id"]), attempt=3, last=True
            )
        assert status == "needs_review"
        assert await transfers(ops_app, op["id"]) == [("reserve", "pending")]  # still pending
        queue = await api.get("/api/admin/operations", headers=admin.headers)
        assert op["id"] in [i["id"] for i in queue.json()["items"]]
        resolved = await api.post(
            f"/api/admin/operations/{op['id']}/resolve",
            json={"performed": True, "note": "provider history shows it"}, headers=admin.headers,
        )  # fmt: skip
        assert resolved.status_code == 200, resolved.text
        assert resolved.json()["status"] == "succeeded"
        again = await api.post(
            f"/api/admin/operations/{op['id']}/resolve", json={"performed": False},
            headers=admin.headers,
        )  # fmt: skip
        assert again.status_code == 409  # never both
        assert await transfers(ops_app, op["id"]) == [("reserve", "pending"), ("settle", "post")]
        audit = await api.get("/api/admin/audit-log", headers=admin.headers)
        if audit.status_code == 200:
            assert "operations.operation.resolve" in audit.text

    async def test_nothing_sent_final_failure_releases(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
    ) -> None:
        await control(world.provider.url, "/_control/config", {"maintenance": True})
        op = (await submit(api, reseller)).json()
        runtime = runtime_of(ops_app)
        async with runtime.db.session() as session:
            status = await operations_service.run(
                session, runtime, UUID(op["id"]), attempt=6, last=True
            )
        assert status == "failed"
        assert await transfers(ops_app, op["id"]) == [("reserve", "pending"), ("release", "void")]


class TestRejected:
    async def test_provider_refusal_fails_at_once_and_releases(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, world: World
    ) -> None:
        """Valid for us, refused by the provider (its own rules): no retry, no charge."""
        await control(world.provider.url, "/_control/config", {"refused_cards": ["1111111111"]})
        op = (await submit(api, reseller, card="1111111111")).json()
        async with ops_worker(runtime_of(ops_app)):
            done = await wait_decided(api, reseller, op["id"])
        assert done["status"] == "failed"
        assert done["error"].startswith("REJECTED")
        assert [a["outcome"] for a in done["attempts"]] == ["rejected"]
        assert await transfers(ops_app, op["id"]) == [("reserve", "pending"), ("release", "void")]


@pytest.mark.parametrize(
    "ops_overrides",
    [
        {
            "OPERATIONS_PROXY_BACKOFF": timedelta(seconds=60),
            "OPERATIONS_PROXY_BACKOFF_MAX": timedelta(seconds=120),
        }
    ],
)
class TestBlockedProxy:
    @pytest.mark.parametrize("mode", ["403", "page"])
    async def test_blocked_proxy_marked_inactive_and_job_moves_on(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, admin: Caller, *,
        world: World, mode: str,
    ) -> None:  # fmt: skip
        blocked_ip = egress_address(0)
        await control(world.provider.url, "/_control/config", {"block_mode": mode})
        await control(world.provider.url, "/_control/block", {"ip": blocked_ip})
        async with ops_worker(runtime_of(ops_app), concurrency=1):
            ids = [
                (await submit(api, reseller, card=f"99990000{i:02d}")).json()["id"]
                for i in range(4)
            ]
            results = [await wait_decided(api, reseller, i) for i in ids]
        assert [r["status"] for r in results] == ["succeeded"] * 4
        proxies = (await api.get("/api/admin/proxies", headers=admin.headers)).json()
        by_label = {p["label"]: p for p in proxies}
        bad = by_label[f"{world.proxies[0].listen}:{world.proxies[0].port}"]
        assert bad["status"] == "inactive"
        assert bad["reason"] == "PROXY_BLOCKED"
        assert bad["blocks"] == 1
        assert bad["retry_at"] is not None
        others = [p for p in proxies if p["id"] != bad["id"]]
        assert all(p["status"] == "active" for p in others)
        state = await control(world.provider.url, "/_control/state")
        from_blocked = [r for r in state["requests"] if r[1] == blocked_ip]
        assert len(from_blocked) == 1  # the one refused request; nothing after the marking
        assert {p["ip"] for p in state["performed"]} <= {egress_address(1), egress_address(2)}


class TestAccounts:
    async def test_bad_credentials_fail_the_account_not_the_proxy(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, admin: Caller,
        world: World,
    ) -> None:  # fmt: skip
        world.provider.provider.accounts["agent1"] = "changed-upstream"
        async with ops_worker(runtime_of(ops_app), concurrency=1):
            ids = [
                (await submit(api, reseller, card=f"88880000{i:02d}")).json()["id"]
                for i in range(3)
            ]
            results = [await wait_decided(api, reseller, i) for i in ids]
        assert [r["status"] for r in results] == ["succeeded"] * 3
        accounts = {
            a["username"]: a
            for a in (await api.get("/api/admin/provider-accounts", headers=admin.headers)).json()
        }
        assert accounts["agent1"]["status"] == "failed"
        assert accounts["agent1"]["last_error"] == "BAD_CREDENTIALS"
        assert "password" not in accounts["agent1"]
        assert "secret" not in accounts["agent1"]
        assert accounts["agent2"]["status"] == "active"
        proxies = (await api.get("/api/admin/proxies", headers=admin.headers)).json()
        assert all(p["status"] == "active" for p in proxies)


class TestReaper:
    async def test_an_operation_whose_job_died_is_decided(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        runtime = runtime_of(ops_app)
        never_sent = (await submit(api, reseller)).json()
        maybe_sent = (await submit(api, reseller)).json()
        async with runtime.db.session() as session:
            # Their jobs failed for good (stalled past the limit), one after the call left.
            await session.execute(
                text("UPDATE jobs SET state = 'failed' WHERE dedup_key IN (:a, :b)"),
                {"a": f"op:{never_sent['id']}", "b": f"op:{maybe_sent['id']}"},
            )
            await session.execute(
                text("UPDATE operations SET status = 'running', sent_at = CASE WHEN id = :b "
                     "THEN now() END, updated_at = now() - interval '1 hour' WHERE id IN (:a, :b)"),
                {"a": UUID(never_sent["id"]), "b": UUID(maybe_sent["id"])},
            )  # fmt: skip
        async with runtime.db.session() as session:
            decided = await operations_service.reap(session, older_than=timedelta(minutes=10))
        assert decided["failed"] >= 1
        assert decided["needs_review"] >= 1
        assert await transfers(ops_app, never_sent["id"]) == [
            ("reserve", "pending"),
            ("release", "void"),
        ]
        assert await transfers(ops_app, maybe_sent["id"]) == [("reserve", "pending")]
        async with runtime.db.session() as session:
            again = await operations_service.reap(session, older_than=timedelta(minutes=10))
        assert again == {"failed": 0, "needs_review": 0}


@pytest.mark.parametrize(
    "ops_overrides",
    [
        {
            "OPERATIONS_PROXY_BACKOFF": timedelta(seconds=60),
            "OPERATIONS_PROXY_BACKOFF_MAX": timedelta(seconds=120),
        }
    ],
)
class TestProbe:
    async def test_a_blocked_proxy_is_rechecked_once_due_and_comes_back(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, admin: Caller, *,
        world: World,
    ) -> None:  # fmt: skip
        runtime = runtime_of(ops_app)
        blocked_ip = egress_address(0)
        await control(world.provider.url, "/_control/block", {"ip": blocked_ip})
        async with ops_worker(runtime, concurrency=1):
            first = (await submit(api, reseller)).json()
            assert (await wait_decided(api, reseller, first["id"]))["status"] == "succeeded"
            label = f"{world.proxies[0].listen}:{world.proxies[0].port}"
            proxies = {
                p["label"]: p
                for p in (await api.get("/api/admin/proxies", headers=admin.headers)).json()
            }
            assert proxies[label]["status"] == "inactive"
            # The site lifts the block; time passes beyond the cool-down (moved, not slept).
            await control(world.provider.url, "/_control/unblock", {})
            async with runtime.db.session() as session:
                await session.execute(
                    text(
                        "UPDATE operations_proxies SET retry_at = now() - interval '1 second' WHERE label = :l"
                    ),
                    {"l": label},
                )
            second = (await submit(api, reseller)).json()
            assert (await wait_decided(api, reseller, second["id"]))["status"] == "succeeded"
        proxies = {
            p["label"]: p
            for p in (await api.get("/api/admin/proxies", headers=admin.headers)).json()
        }
        assert proxies[label]["status"] == "active"  # the probe went through: back in service
        assert proxies[label]["reason"] is None
        state = await control(world.provider.url, "/_control/state")
        assert state["performed"][-1]["ip"] == blocked_ip  # the due proxy got the next request

    async def test_a_request_picked_before_the_mark_does_not_lift_it(
        self, ops_app: FastAPI, *, world: World
    ) -> None:
        """Two requests go out through one proxy; the first is refused (403) and marks it
        blocked, the second, picked before the mark, comes back fine afterwards. Only the
        fleet's probe may lift a block: the late success leaves the proxy inactive, its
        backoff count untouched (seen in the chaos test: a pick 41 ms after a mark)."""
        from surge.operations import repository

        runtime = runtime_of(ops_app)
        async with runtime.db.session() as session:
            early = await repository.pick_proxy(session, exclude=[], probe_hold=timedelta(1))
        assert early is not None
        assert early.status == "active"
        async with runtime.db.session() as session:
            marked = await repository.proxy_down(
                session, early.id, reason="PROXY_BLOCKED", error="403", blocked=True,
                max_failures=3, backoff=lambda n: timedelta(minutes=5),
            )  # fmt: skip
        assert marked is not None
        assert marked.status == "inactive"
        async with runtime.db.session() as session:
            lifted = await repository.proxy_ok(session, early.id, probe=early.status == "inactive")
        assert not lifted
        async with runtime.db.session() as session:
            row = (
                await session.execute(
                    text("SELECT status, failures FROM operations_proxies WHERE id = :i"),
                    {"i": early.id},
                )
            ).one()
        assert row.status == "inactive"
        assert row.failures == marked.failures


@pytest.mark.parametrize(
    "ops_overrides",
    [
        {
            "OPERATIONS_PROXY_BACKOFF": timedelta(seconds=60),
            "OPERATIONS_PROXY_BACKOFF_MAX": timedelta(seconds=120),
            "OPERATIONS_MAX_ATTEMPTS": 2,
            "OPERATIONS_RETRY_BACKOFF": timedelta(milliseconds=50),
            "OPERATIONS_TIMEOUT": timedelta(milliseconds=400),  # the waiters' re-check cap
        }
    ],
)
class TestFleetDown:
    async def test_an_operation_waits_for_the_fleet_without_spending_attempts(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller, *, world: World
    ) -> None:
        """Every proxy blocked: the first attempt marks them all and is spent; from then on
        the job snoozes (the operation back to ``queued``, ``WAITING``) well past its two
        attempts, and succeeds once a proxy's re-check is due and the site lets it through.
        Before, each start with no proxy to pick spent an attempt, and the operation failed
        with NO_PROXY while its fleet was only cooling down."""
        from prometheus_client import REGISTRY

        from tests.fixtures.waiting import eventually

        runtime = runtime_of(ops_app)
        for n in range(len(world.proxies)):
            await control(world.provider.url, "/_control/block", {"ip": egress_address(n)})

        def snoozes() -> float:
            found = REGISTRY.get_sample_value("surge_jobs_snoozed_total", {"queue": "operations"})
            return found or 0.0

        before = snoozes()
        async with ops_worker(runtime, concurrency=1):
            op = (await submit(api, reseller)).json()
            await eventually(lambda: snoozes() - before >= 4, timeout=30)
            waiting = await api.get(f"/api/v1/operations/{op['id']}", headers=reseller.headers)
            assert waiting.json()["status"] == "queued", waiting.text
            assert waiting.json()["error"].startswith("WAITING: NO_PROXY: every egress proxy"), (
                waiting.text
            )
            await control(world.provider.url, "/_control/unblock", {})
            async with runtime.db.session() as session:
                await session.execute(
                    text("UPDATE operations_proxies SET retry_at = now() - interval '1 second'")
                )
            done = await wait_decided(api, reseller, op["id"])
        assert done["status"] == "succeeded", done
        assert done["error"] is None
        async with runtime.db.session() as session:
            attempts = await session.scalar(
                text("SELECT attempts FROM jobs WHERE dedup_key = :k"), {"k": f"op:{op['id']}"}
            )
        assert attempts == 2  # the blocked one and the one that went through
        assert await transfers(ops_app, op["id"]) == [("reserve", "pending"), ("settle", "post")]


@pytest.mark.parametrize(
    "ops_overrides",
    [
        {
            "OPERATIONS_MAX_ATTEMPTS": 2,
            "OPERATIONS_RETRY_BACKOFF": timedelta(milliseconds=50),
            "OPERATIONS_ACCOUNT_LEASE": timedelta(milliseconds=400),  # waits a quarter in-job
            "OPERATIONS_TIMEOUT": timedelta(milliseconds=400),  # the waiters' re-check cap
        }
    ],
)
class TestAccountsBusy:
    async def test_an_operation_waits_for_an_account_without_spending_attempts(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        """Every provider account leased by other jobs (for an hour here): the job snoozes,
        the operation back to ``queued`` with ``WAITING: NO_ACCOUNT``, well past its two
        attempts, and succeeds on its first attempt once an account is free. Before (ADR
        0060), each start spent an attempt and the operation failed with NO_ACCOUNT."""
        from prometheus_client import REGISTRY

        from tests.fixtures.waiting import eventually

        runtime = runtime_of(ops_app)
        async with runtime.db.session() as session:
            await session.execute(
                text(
                    "UPDATE operations_provider_accounts SET lease_token = gen_random_uuid(),"
                    " leased_until = now() + interval '1 hour'"
                )
            )

        def snoozes() -> float:
            found = REGISTRY.get_sample_value("surge_jobs_snoozed_total", {"queue": "operations"})
            return found or 0.0

        before = snoozes()
        async with ops_worker(runtime, concurrency=1):
            op = (await submit(api, reseller)).json()
            await eventually(lambda: snoozes() - before >= 4, timeout=30)
            waiting = await api.get(f"/api/v1/operations/{op['id']}", headers=reseller.headers)
            assert waiting.json()["status"] == "queued", waiting.text
            assert waiting.json()["error"].startswith(
                "WAITING: NO_ACCOUNT: every provider account is busy"
            ), waiting.text
            async with runtime.db.session() as session:
                await session.execute(
                    text("UPDATE operations_provider_accounts SET leased_until = NULL")
                )
            done = await wait_decided(api, reseller, op["id"])
        assert done["status"] == "succeeded", done
        assert done["error"] is None
        async with runtime.db.session() as session:
            attempts = await session.scalar(
                text("SELECT attempts FROM jobs WHERE dedup_key = :k"), {"k": f"op:{op['id']}"}
            )
        assert attempts == 1  # every snoozed start given back

    async def test_no_active_account_still_spends_the_attempt(
        self, ops_app: FastAPI, api: httpx.AsyncClient, reseller: Caller
    ) -> None:
        """Nothing will free itself (every account disabled): no waiting, the attempts are
        spent and the operation fails, released, as before."""
        runtime = runtime_of(ops_app)
        async with runtime.db.session() as session:
            await session.execute(
                text("UPDATE operations_provider_accounts SET status = 'disabled'")
            )
        async with ops_worker(runtime, concurrency=1):
            op = (await submit(api, reseller)).json()
            done = await wait_decided(api, reseller, op["id"])
        assert done["status"] == "failed", done
        assert done["error"] == "NO_ACCOUNT: no provider account is active"
        assert await transfers(ops_app, op["id"]) == [("reserve", "pending"), ("release", "void")]
