"""The baseline of ``surge bench operations``: the same job written the plain way.

Imported through ``SURGE_JOBS_MODULES`` (after the domains' jobs), it replaces the
``operations.run`` handler with seed 000's straightforward one: per job, a fresh httpx client
through the next proxy in turn, log in (no session cache, no account lease, no proxy health),
renew, settle. Same API, same queue, same ledger; only the provider-driving part differs.
"""

from __future__ import annotations

import itertools
import re
from uuid import UUID

import httpx
from sqlalchemy import text

from surge.kit.jobs import JobContext, job
from surge.kit.jobs.registry import unregister
from surge.operations.service import RUN_JOB, sealer
from surge.wallet.funds import funds as funds_service

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_turn = itertools.count()

unregister(RUN_JOB)


@job(RUN_JOB, queue="operations", max_attempts=5)
async def plain_run(ctx: JobContext) -> None:
    runtime = ctx.runtime
    operation_id = UUID(str(ctx.payload["operation_id"]))
    async with runtime.db.session() as s:
        op = (
            await s.execute(
                text(
                    "SELECT card, package, months, hold_id, status FROM operations WHERE id = :id"
                ),
                {"id": operation_id},
            )
        ).one()
        proxies = (
            await s.execute(text("SELECT secret FROM operations_proxies ORDER BY label"))
        ).all()
        accounts = (
            await s.execute(
                text("SELECT username, secret FROM operations_provider_accounts ORDER BY username")
            )
        ).all()
    if op.status != "queued":
        return
    n = next(_turn)
    box = sealer(runtime)
    proxy = box.open(proxies[n % len(proxies)].secret)
    account = accounts[n % len(accounts)]
    async with httpx.AsyncClient(
        base_url=runtime.settings.OPERATIONS_PROVIDER_URL, proxy=proxy, trust_env=False, timeout=15
    ) as http:
        page = await http.get("/login")
        csrf = _CSRF.search(page.text)
        assert csrf is not None
        await http.post(
            "/login",
            data={"username": account.username, "password": box.open(account.secret),
                  "csrf": csrf.group(1)},
        )  # fmt: skip
        dashboard = await http.get("/dashboard")
        token = _CSRF.search(dashboard.text)
        assert token is not None
        answer = await http.post(
            "/renew",
            data={"card": op.card, "package": op.package, "months": str(op.months),
                  "reference": str(operation_id), "csrf": token.group(1)},
        )  # fmt: skip
        answer.raise_for_status()
        assert 'class="ok"' in answer.text
    await funds_service.settle(
        ctx.session, op.hold_id, key=f"op:{operation_id}:settle", kind="operation"
    )
    await ctx.session.execute(
        text("UPDATE operations SET status = 'succeeded', finished_at = now() WHERE id = :id"),
        {"id": operation_id},
    )
