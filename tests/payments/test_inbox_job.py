"""The inbox job holds the hot ``payments`` account the shortest it can (ADR 0053): the
credit's posting locks that row, shared by every top-up, until the commit, so nothing
else of the job may run after it — every other payment's job waits meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from sqlalchemy import event

from surge.kit import db as kit_db
from tests.fixtures.payments import SIM_SECRET
from tests.payments.conftest import Live
from tests.payments.test_webhooks import intent_event, ledger_count, post

#: What may follow the posting: repaying a debt from the credit, and the job's completion.
AFTER_THE_POSTING = ("wallet_collect(", "UPDATE jobs SET state = 'succeeded'")


@pytest.fixture
def job_statements(live: Live, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, str]]]:
    """Every statement a job sends, in order, as (job id, SQL): SQLAlchemy's and those sent
    to the driver directly (``driver_fetch``, the ledger's)."""
    seen: list[tuple[Any, str]] = []

    def record(statement: str) -> None:
        job = structlog.contextvars.get_contextvars().get("job_id")
        if job is not None:
            seen.append((job, " ".join(statement.split())))

    def on_cursor(*args: Any) -> None:
        record(args[2])

    observe = kit_db.observe_statement

    def observed(engine: Any, statement: str, started: float) -> None:
        record(statement)
        observe(engine, statement, started)

    engine = live.runtime.db.primary.sync_engine
    event.listen(engine, "before_cursor_execute", on_cursor)
    monkeypatch.setattr(kit_db, "observe_statement", observed)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_cursor)


async def test_the_credit_is_the_jobs_last_write(
    live: Live, job_statements: list[tuple[Any, str]]
) -> None:
    caller = await live.reseller()
    webhook = intent_event(caller.id, amount=1_500)
    assert (await post(live, webhook, secrets=[SIM_SECRET])).status_code == 200
    await live.settled()
    assert await ledger_count(live, webhook["data"]["object"]["id"]) == 1
    [job] = {job for job, sql in job_statements if "wallet_transfer(" in sql}
    mine = [sql for j, sql in job_statements if j == job]
    posting = next(i for i, sql in enumerate(mine) if "wallet_transfer(" in sql)
    after = [sql for sql in mine[posting + 1 :] if not any(m in sql for m in AFTER_THE_POSTING)]
    assert after == [], f"statements run under the payments account's lock: {after}"
    # The record of the credit was written before it, in the same job.
    assert any(sql.startswith("UPDATE payment_topups") for sql in mine[:posting]), mine
    assert any(sql.startswith("UPDATE payment_events") for sql in mine[:posting]), mine
