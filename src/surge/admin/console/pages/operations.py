"""``/admin/operations``: every reseller operation by status, the review queue first
(``needs_review``: the provider may have done the work, nobody could tell), and the action
that decides one — settle (it was done) or release (it was not), confirmed and audited."""

from __future__ import annotations

import uuid
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from surge.admin.console import views
from surge.admin.console.service import console as console_service
from surge.admin.console.session import ConsoleError, first
from surge.admin.console.views import e, form, money, page, table, when
from surge.admin.console.web import CallerDep, answered, html, once, posted, redirect
from surge.kit.errors import SurgeError
from surge.kit.web.deps import RuntimeDep, SessionDep, request_id

router = APIRouter(include_in_schema=False)

STATUSES = ("needs_review", "queued", "running", "succeeded", "failed")
ACTIONS = {"yes": "Performed: settle", "no": "Not performed: release"}


@router.get("/operations")
async def operations_view(
    *,
    caller: CallerDep,
    db: SessionDep,
    status: Annotated[str, Query(pattern="^(needs_review|queued|running|succeeded|failed)$")] = (
        "needs_review"
    ),
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    flash: str = "",
) -> Response:
    csrf = caller.session.csrf
    counts = await console_service.operation_counts(db)
    found, next_cursor = await console_service.operations(db, status=status, cursor=cursor)
    tabs = " ".join(
        f'<a href="/admin/operations?status={s}" id="tab-{s}"'
        f"{' class=active' if s == status else ''}>{s} ({counts.get(s, 0)})</a>"
        for s in STATUSES
    )
    rows = []
    for op in found:
        actions = ""
        if op.status == "needs_review":
            note = '<input name="note" placeholder="what the provider shows" maxlength="500">'
            actions = "".join(
                form(f"/admin/operations/{op.id}/resolve", csrf, f"{label}…",
                     fields={"performed": performed}, extra=note,
                     button_id=f"resolve-{performed}-{op.id}")
                for performed, label in ACTIONS.items()
            )  # fmt: skip
        what = f"{op.kind} {op.package or ''}{f' × {op.months}' if op.months else ''}"
        rows.append(
            (e(op.id), e(op.owner_id), e(what), e(op.card), money(op.amount, op.currency),
             e(op.status), e(op.error or "–"), when(op.sent_at), when(op.updated_at), actions)
        )  # fmt: skip
    more = (
        f'<p><a id="next-page" href="/admin/operations?status={status}&cursor={quote(next_cursor)}">'
        "Next page</a></p>"
        if next_cursor
        else ""
    )
    hint = (
        '<p class="hint">In review: a call may have reached the provider but no answer '
        "says whether it was done. Check the card's history at the provider, then settle "
        "(the reseller pays) or release (the reserved amount goes back).</p>"
        if status == "needs_review"
        else ""
    )
    body = f'<p class="tabs">{tabs}</p>{hint}' + table(
        ["operation", "reseller", "what", "card", "amount", "status", "error", "sent", "updated",
         ""],
        rows,
        table_id="operations",
    ) + more  # fmt: skip
    return html(page("Operations", body, caller, active="operations", flash=flash))


@router.post("/operations/{operation_id}/resolve")
async def resolve(
    operation_id: uuid.UUID, request: Request, caller: CallerDep, db: SessionDep,
    runtime: RuntimeDep,
) -> Response:  # fmt: skip
    fields = await posted(request, caller)
    performed = first(fields, "performed")
    if performed not in ACTIONS:
        raise ConsoleError("Say whether the provider performed it", status_code=422)
    note = first(fields, "note")[:500] or None
    try:
        operation = await console_service.operation(db, operation_id)
    except SurgeError as error:
        raise ConsoleError(error.message, status_code=error.status_code) from None
    if first(fields, "confirm") != "yes":
        what = f"{money(operation.amount, operation.currency)} for card {operation.card}"
        question = (
            f"The provider performed operation {operation.id}: settle {what}? The reseller pays."
            if performed == "yes"
            else f"The provider did not perform operation {operation.id}: release {what}? "
            "The reserved amount goes back to the reseller."
        )
        return html(views.confirm(caller, title=ACTIONS[performed], question=question,
                                  action=str(request.url.path),
                                  fields={"performed": performed, "note": note or ""},
                                  active="operations", danger=performed == "no"))  # fmt: skip

    async def act() -> Response:
        done = await console_service.resolve_operation(
            db, runtime, caller, operation_id=operation_id, performed=performed == "yes", note=note,
            request_id=request_id(request),
        )  # fmt: skip
        return redirect(f"/admin/operations?flash=Operation+{done.id}+{quote(done.status)}")

    replayed = f"/admin/operations?flash=Operation+{operation_id}+already+resolved"
    return await once(request, db, caller, fields, lambda: answered(caller, act), replayed=replayed)
