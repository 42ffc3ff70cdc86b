"""``/admin/keys``: the service API keys (``surge.credential``) — list, create (the key is
shown on the answer page once, never again), revoke. Every change confirmed and audited."""

from __future__ import annotations

import uuid
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from surge.admin.console import views
from surge.admin.console.service import console as console_service
from surge.admin.console.session import first
from surge.admin.console.views import e, form, page, table, when
from surge.admin.console.web import CallerDep, answered, html, posted, redirect
from surge.credential.service import SCOPES
from surge.kit.web.deps import RuntimeDep, SessionDep, request_id

router = APIRouter(include_in_schema=False)


@router.get("/keys")
async def keys_view(
    *,
    caller: CallerDep,
    db: SessionDep,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    flash: str = "",
) -> Response:
    csrf = caller.session.csrf
    found = await console_service.service_keys(db, cursor=cursor)
    rows = [
        (e(k.name), f"<code>{e(k.prefix)}</code>", e(", ".join(k.scopes)), when(k.created_at),
         when(k.last_used_at), when(k.expires_at), "revoked " + when(k.revoked_at) if k.revoked_at
         else form(f"/admin/keys/{k.id}/revoke", csrf, "Revoke…", button_id=f"revoke-{k.id}"))
        for k in found.items
    ]  # fmt: skip
    more = (
        f'<p><a id="next-page" href="/admin/keys?cursor={quote(found.next_cursor)}">Next page</a></p>'
        if found.next_cursor
        else ""
    )
    scopes = "".join(
        f'<label><input type="checkbox" name="scopes" value="{e(s)}" checked> {e(s)}</label>'
        for s in sorted(SCOPES)
    )
    create = form(
        "/admin/keys", csrf, "Create…", button_id="create-key",
        extra='<input name="name" placeholder="who uses it (billing-exporter)" maxlength="200" '
        f"required> {scopes}",
    )  # fmt: skip
    body = (
        '<p class="hint">A key authenticates one server-to-server caller for its scopes. '
        "Its secret is shown once, when it is created.</p>"
        + f'<div class="card" id="new-key">{create}</div>'
        + table(["name", "prefix", "scopes", "created", "last used", "expires", ""], rows,
                table_id="keys")
        + more
    )  # fmt: skip
    return html(page("Service API keys", body, caller, active="keys", flash=flash))


@router.post("/keys")
async def create_key(
    request: Request, caller: CallerDep, db: SessionDep, runtime: RuntimeDep
) -> Response:
    fields = await posted(request, caller)
    name = first(fields, "name")[:200]
    scopes = [s for s in fields.get("scopes", []) if s][:20]
    if first(fields, "confirm") != "yes":
        question = f"Create a service key “{name}” with the scopes {', '.join(scopes) or '(none)'}?"
        return html(views.confirm(caller, title="Create a service key", question=question,
                                  action="/admin/keys", fields={"name": name, "scopes": scopes},
                                  active="keys"))  # fmt: skip

    async def act() -> Response:
        issued = await console_service.create_service_key(
            db, runtime, caller, name=name, scopes=scopes, request_id=request_id(request)
        )
        body = (
            f'<div class="card" id="issued"><p>Key <b>{e(issued.key.name)}</b> created. Copy '
            "it now: it is shown this once and stored only as a hash.</p>"
            f'<p><code id="secret">{e(issued.secret)}</code></p>'
            "<p>It is refused until a different administrator approves it on the "
            f'<a href="/admin/approvals">approvals page</a> (request {e(str(issued.approval_id))}).'
            '</p><p><a href="/admin/keys">Back to the keys</a></p></div>'
        )
        return html(page("Service key created", body, caller, active="keys"))

    return await answered(caller, act)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    key_id: uuid.UUID, request: Request, caller: CallerDep, db: SessionDep
) -> Response:
    fields = await posted(request, caller)
    if first(fields, "confirm") != "yes":
        return html(views.confirm(caller, title="Revoke a service key",
                                  question=f"Revoke service key {key_id}? Its caller is refused "
                                  "from the next request on.",
                                  action=str(request.url.path), fields={}, active="keys",
                                  danger=True))  # fmt: skip

    async def act() -> Response:
        key = await console_service.revoke_service_key(
            db, caller, key_id=key_id, request_id=request_id(request)
        )
        return redirect(f"/admin/keys?flash=Key+{quote(key.prefix)}+revoked")

    return await answered(caller, act)
