"""``/admin/approvals``: money actions waiting for a second administrator (four-eyes,
ADR 0059) — list, approve (the action happens now), reject. Each decision confirmed, once
per rendered form, and audited; the maker of a request sees it but cannot decide it."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal
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

Status = Literal["pending", "approved", "rejected", "expired"]


@router.get("/approvals")
async def approvals_view(
    *,
    caller: CallerDep,
    db: SessionDep,
    status: Status = "pending",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    flash: str = "",
) -> Response:
    csrf, me = caller.session.csrf, caller.principal.user_id
    found = await console_service.approvals(db, status=status, cursor=cursor)

    def actions(a_id: uuid.UUID, maker: uuid.UUID) -> str:
        if status != "pending":
            return ""
        if maker == me:
            return '<span class="hint">yours: another administrator decides</span>'
        return form(
            f"/admin/approvals/{a_id}/approve", csrf, "Approve…", button_id=f"approve-{a_id}"
        ) + form(f"/admin/approvals/{a_id}/reject", csrf, "Reject…", button_id=f"reject-{a_id}")

    rows = [
        (e(a.action), f"{e(a.subject_type)} <code>{e(a.subject_id)}</code>",
         money(a.amount, a.currency) if a.currency else e(str(a.params)), e(str(a.maker_id)),
         when(a.created_at), when(a.expires_at), e(a.reason or ""),
         e(str(a.checker_id or "")), actions(a.id, a.maker_id))
        for a in found.items
    ]  # fmt: skip
    more = (
        f'<p><a id="next-page" href="/admin/approvals?status={status}&cursor='
        f'{quote(found.next_cursor)}">Next page</a></p>'
        if found.next_cursor
        else ""
    )
    tabs = " · ".join(
        f'<a href="/admin/approvals?status={s}">{s}</a>'
        for s in ("pending", "approved", "rejected", "expired")
    )
    body = (
        '<p class="hint">Above the threshold, an administrator\'s money action waits here '
        "until a different administrator approves it (it then happens) or rejects it.</p>"
        + f"<p>{tabs}</p>"
        + table(["action", "subject", "amount", "asked by", "asked", "expires", "reason",
                 "decided by", ""], rows, table_id="approvals")
        + more
    )  # fmt: skip
    return html(page("Approvals", body, caller, active="approvals", flash=flash))


@router.post("/approvals/{approval_id}/{verb}")
async def decide(
    approval_id: uuid.UUID,
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
    try:
        found = await console_service.approval(db, approval_id)
    except SurgeError as error:
        raise ConsoleError(error.message, status_code=error.status_code) from None
    if first(fields, "confirm") != "yes":
        what = f"{found.action} on {found.subject_type} {found.subject_id}" + (
            f" ({money(found.amount, found.currency)})" if found.currency else ""
        )
        question = (
            f"Approve {what}? It happens now, in your name as the second administrator."
            if verb == "approve"
            else f"Reject {what}? Nothing happens."
        )
        return html(views.confirm(caller, title=f"{verb.title()} a request", question=question,
                                  action=str(request.url.path), fields={}, active="approvals",
                                  danger=verb == "approve"))  # fmt: skip
    done = "approved" if verb == "approve" else "rejected"

    async def act() -> Response:
        await console_service.decide_approval(
            db, runtime, caller, approval_id=approval_id, approve=verb == "approve",
            reason=None, request_id=request_id(request),
        )  # fmt: skip
        return redirect(f"/admin/approvals?flash=Request+{done}")

    replayed = f"/admin/approvals?flash=Request+{done}"
    return await once(request, db, caller, fields, lambda: answered(caller, act), replayed=replayed)
