"""``/admin/withdrawals``: pending, approved and rejected withdrawals; approve, reject, batch."""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from surge.admin.console import views
from surge.admin.console.service import console as console_service
from surge.admin.console.session import ConsoleError, first
from surge.admin.console.views import e, form, money, page, table, when
from surge.admin.console.web import CallerDep, answered, html, once, posted, redirect
from surge.kit.web.deps import RuntimeDep, SessionDep, request_id
from surge.wallet.service import wallet as wallet_service

router = APIRouter(include_in_schema=False)


@router.get("/withdrawals")
async def withdrawals(
    *,
    caller: CallerDep,
    db: SessionDep,
    runtime: RuntimeDep,
    status: Annotated[str, Query(pattern="^(pending|approved|rejected)$")] = "pending",
    flash: str = "",
) -> Response:
    csrf = caller.session.csrf
    items = await console_service.withdrawals(db, status, limit=100)
    balances: dict[uuid.UUID, Any] = {}
    for item in items:
        if item["owner_id"] not in balances:
            found = await wallet_service.withdrawable(db, runtime, item["owner_id"])
            balances[item["owner_id"]] = found
    rows = []
    for w in items:
        b, withdrawable = balances.get(w["owner_id"]) or (None, 0)
        actions = ""
        if w["status"] == "pending":
            actions = (
                f'<input type="checkbox" form="batch" name="ids" value="{e(w["id"])}" '
                f'class="pick" aria-label="select">'
                + form(f"/admin/withdrawals/{w['id']}/approve", csrf, "Approve…")
                + form(
                    f"/admin/withdrawals/{w['id']}/reject", csrf, "Reject…",
                    extra='<input name="reason" placeholder="reason (required)" maxlength="500" required>',
                    button_id=f"reject-{w['id']}",
                )
            )  # fmt: skip
        rows.append(
            (e(w["email"]), money(w["amount"], w["currency"]), when(w["created_at"]),
             money(b.balance, b.currency) if b else "–", money(b.available, b.currency) if b else "–",
             money(withdrawable, b.currency) if b else "–",
             money(b.debt, b.currency) if b else "–",
             e(w["status"]) + (f"<br><small>{e(w['reason'])}</small>" if w["reason"] else ""),
             actions)
        )  # fmt: skip
    tabs = " ".join(
        f'<a href="/admin/withdrawals?status={s}"{" class=active" if s == status else ""}>{s}</a>'
        for s in ("pending", "approved", "rejected")
    )
    batch = (
        '<form method="post" action="/admin/withdrawals/batch" id="batch" class="inline">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        '<button type="submit" id="batch-approve">Approve selected…</button></form>'
        if status == "pending"
        else ""
    )
    body = f'<p class="tabs">{tabs}</p>{batch}' + table(
        ["partner", "amount", "requested", "balance", "available", "withdrawable", "debt",
         "status", ""],
        rows,
        table_id="withdrawals",
    )  # fmt: skip
    owing = await console_service.debts(db, limit=100)
    debt_rows = [
        (e(d["email"]), money(d["debt"], d["currency"]), money(d["balance"], d["currency"]),
         money(d["available"], d["currency"]), when(d["updated_at"]))
        for d in owing
    ]  # fmt: skip
    body += (
        "<h2>Wallets in debt</h2><p>A refunded or charged-back top-up the wallet could not "
        "cover: the partner withdraws nothing until top-ups and earnings have repaid it "
        "(ADR 0042). Reject its pending withdrawals: their amount repays the debt.</p>"
        + table(
            ["partner", "debt", "balance", "available", "last change"], debt_rows, table_id="debts"
        )
    )
    system_rows = [
        (e(a["code"]), money(a["balance"], a["currency"]), money(a["pending_in"], a["currency"]),
         money(a["pending_out"], a["currency"]), str(a["stripes"]),
         f'{money(a["smallest"], a["currency"])} … {money(a["largest"], a["currency"])}'
         if a["stripes"] > 1 else "–")
        for a in await wallet_service.system_balances(db)
    ]  # fmt: skip
    body += (
        "<h2>System accounts</h2><p>The platform's side of the ledger, each account's total "
        "over its stripes (ADR 0058: a hot account is several rows chosen by owner; every "
        "stripe keeps its own history).</p>"
        + table(
            ["account", "balance", "reserved in", "reserved out", "stripes", "stripe range"],
            system_rows,
            table_id="system-accounts",
        )
    )
    return html(page("Withdrawals", body, caller, active="withdrawals", flash=flash))


@router.post("/withdrawals/{withdrawal_id}/{verb}")
async def decide(
    withdrawal_id: uuid.UUID,
    verb: str,
    *,
    request: Request,
    caller: CallerDep,
    db: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    fields = await posted(request, caller)
    if verb not in {"approve", "reject"}:
        raise ConsoleError("Unknown action", status_code=404)
    reason = first(fields, "reason")[:500] or None
    found = await console_service.withdrawal(db, withdrawal_id)
    if found is None:
        raise ConsoleError("No such withdrawal", status_code=404)
    if first(fields, "confirm") != "yes":
        what = f"{money(found['amount'], found['currency'])} for {found['email']}"
        question = (
            f"Approve the withdrawal of {what}? The money leaves the wallet."
            if verb == "approve"
            else f"Reject the withdrawal of {what}? Reason given to the partner: “{reason or ''}”"
        )
        return html(views.confirm(caller, title=f"{verb.title()} a withdrawal", question=question,
                                  action=str(request.url.path), fields={"reason": reason or ""},
                                  active="withdrawals", danger=verb == "reject"))  # fmt: skip
    done = "approved" if verb == "approve" else "rejected"

    async def act() -> Response:
        await console_service.decide_withdrawal(
            db, runtime, caller, withdrawal_id=withdrawal_id, approve=verb == "approve",
            reason=reason, request_id=request_id(request),
        )  # fmt: skip
        return redirect(f"/admin/withdrawals?flash=Withdrawal+{done}")

    replayed = f"/admin/withdrawals?flash=Withdrawal+{done}"
    return await once(request, db, caller, fields, lambda: answered(caller, act), replayed=replayed)


@router.post("/withdrawals/batch")
async def batch(
    request: Request, caller: CallerDep, db: SessionDep, runtime: RuntimeDep
) -> Response:
    fields = await posted(request, caller)
    ids = []
    for raw in fields.get("ids", [])[:100]:
        with contextlib.suppress(ValueError):
            ids.append(uuid.UUID(raw))
    if not ids:
        return redirect("/admin/withdrawals?flash=Select+withdrawals+first")
    if first(fields, "confirm") != "yes":
        return html(views.confirm(caller, title="Approve withdrawals",
                                  question=f"Approve {len(ids)} withdrawal(s)? Each is decided on its own.",
                                  action="/admin/withdrawals/batch", fields={"ids": [str(i) for i in ids]},
                                  active="withdrawals", count=len(ids)))  # fmt: skip

    async def act() -> Response:
        results = await console_service.batch_approve(
            db, runtime, caller, ids=ids, request_id=request_id(request)
        )
        outcome = [(r.id, r.ok, r.detail) for r in results]
        return html(views.results(caller, "Batch approval", outcome, "withdrawals"))

    return await once(request, db, caller, fields, act, replayed="/admin/withdrawals")
