"""A worker killed with SIGKILL in the middle of an earnings batch: after the retry every
active partner is credited exactly once (real worker processes, real PostgreSQL)."""

from __future__ import annotations

import subprocess
from contextlib import AbstractContextManager
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import text

import surge.wallet.jobs
from surge.kit.runtime import Runtime
from surge.wallet.ledger import ledger
from surge.wallet.service import wallet as wallet_service
from surge.wallet.values import earning_for
from tests.fixtures.waiting import eventually
from tests.fixtures.workers import worker_process
from tests.wallet.factories import create_partner

ROOT = Path(__file__).resolve().parents[2]
PARTNERS = 120  # three batches of 50 at least, whatever other tests left active


def wallet_worker_process(
    runtime: Runtime, log: Path
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    return worker_process(
        runtime.settings, log, ["wallet"], concurrency=2, SURGE_JOBS_LEASE="PT1S",
        SURGE_JOBS_STALLED_CHECK="PT0.3S", SURGE_JOBS_POLL_INTERVAL="PT0.1S",
        SURGE_JOBS_BACKOFF="PT0.1S",
    )  # fmt: skip


@pytest.mark.chaos
async def test_sigkill_mid_batch_credits_every_partner_exactly_once(
    runtime: Runtime, tmp_path: Path
) -> None:
    assert surge.wallet.jobs  # registers the wallet jobs in this process (enqueue needs them)
    event_id = f"crash-{uuid4()}"
    async with runtime.db.session() as session:
        for i in range(PARTNERS):
            await create_partner(session, runtime, share_bps=1_000 + i)
    # Every INSERT into wallet_earnings waits behind this lock: the worker's batch performs
    # its ledger transfers, then blocks on writing the earning rows — mid-batch.
    blocker = await runtime.db.primary.connect()
    await blocker.begin()
    await blocker.execute(text("LOCK TABLE wallet_earnings IN SHARE MODE"))
    try:
        async with runtime.db.session() as session:
            await wallet_service.record_revenue_event(
                session, runtime, event_id=event_id, kind="game", profit=1_000_000
            )
            expected = {
                owner: earning_for(1_000_000, share, commission)[1]
                for owner, share, commission in (
                    await session.execute(
                        text(
                            "SELECT owner_id, share_bps, commission_bps FROM wallet_partners "
                            "WHERE active"
                        )
                    )
                ).all()
            }
        expected = {owner: amount for owner, amount in expected.items() if amount >= 1}

        with wallet_worker_process(runtime, tmp_path / "worker-1.log") as worker:

            async def blocked_mid_batch() -> bool:
                async with runtime.db.session() as session:
                    waiting = await session.scalar(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND query LIKE 'INSERT INTO wallet_earnings%' "
                            "AND backend_xid IS NOT NULL"  # it has written: transfers done
                        )
                    )
                return bool(waiting)

            await eventually(blocked_mid_batch, timeout=30.0)
            worker.kill()  # SIGKILL: no cleanup, the connection just drops
            worker.wait()
    finally:
        await blocker.rollback()
        await blocker.close()

    async with runtime.db.session() as session:
        credited = await session.scalar(
            text("SELECT count(*) FROM wallet_transfers WHERE idempotency_key LIKE :k"),
            {"k": f"earning:{event_id}:%"},
        )
    assert credited == 0  # the killed batch left nothing behind

    with wallet_worker_process(runtime, tmp_path / "worker-2.log"):

        async def all_jobs_done() -> bool:
            async with runtime.db.session() as session:
                states = (
                    (
                        await session.execute(
                            text(
                                "SELECT state FROM jobs WHERE name = 'wallet.earnings.credit' "
                                "AND payload->>'event_id' = :e"
                            ),
                            {"e": event_id},
                        )
                    )
                    .scalars()
                    .all()
                )
            batches = -(-len(expected) // 50)
            return len(states) >= batches and all(s == "succeeded" for s in states)

        await eventually(all_jobs_done, timeout=60)

    async with runtime.db.session() as session:
        rows = (
            await session.execute(
                text(
                    "SELECT e.owner_id, e.amount, t.amount FROM wallet_earnings e "
                    "JOIN wallet_transfers t ON t.id = e.transfer_id WHERE e.event_id = :e"
                ),
                {"e": event_id},
            )
        ).all()
        transfers = await session.scalar(
            text("SELECT count(*) FROM wallet_transfers WHERE idempotency_key LIKE :k"),
            {"k": f"earning:{event_id}:%"},
        )
        problems = await ledger.check_invariants(session)
    credited_to = [owner for owner, _, _ in rows]
    assert len(credited_to) == len(set(credited_to))  # nobody twice
    assert {owner: amount for owner, amount, _ in rows} == expected  # everybody, right amount
    assert all(earning == moved for _, earning, moved in rows)
    assert transfers == len(expected)
    assert problems == []
