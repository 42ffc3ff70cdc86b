"""``/admin`` system pages: breakers, caches, users (revoke sessions), audit log, alerts."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from surge.admin.console import views
from surge.admin.console.service import console as console_service
from surge.admin.console.session import ConsoleError, first
from surge.admin.console.timeseries import read_alerts
from surge.admin.console.views import e, form, page, table, when
from surge.admin.console.web import CallerDep, html, posted, redirect
from surge.identity.runtime import identity_state
from surge.kit.breaker import breakers
from surge.kit.web.deps import RuntimeDep, SessionDep, request_id

router = APIRouter(include_in_schema=False)


# ---- breakers, caches --------------------------------------------------------------------------
@router.get("/breakers")
async def breakers_view(caller: CallerDep, flash: str = "") -> Response:
    csrf = caller.session.csrf
    rows = [
        (e(b["name"]), e(b["state"]), f"{b['failure_rate'] * 100:.1f} %",
         e(f"{b['window']['failures']}/{b['window']['calls']}"), e(b.get("last_error") or "–"),
         form("/admin/breakers/reset", csrf, "Reset…", fields={"name": b["name"]}))
        for b in breakers.status()
    ]  # fmt: skip
    body = table(["breaker", "state", "failure rate", "failures/calls", "last error", ""], rows,
                 table_id="breakers") + form("/admin/breakers/reset", csrf, "Reset all…")  # fmt: skip
    return html(page("Circuit breakers", body, caller, active="breakers", flash=flash))


@router.post("/breakers/reset")
async def breakers_reset(request: Request, caller: CallerDep, db: SessionDep) -> Response:
    fields = await posted(request, caller)
    name = first(fields, "name") or None
    if first(fields, "confirm") != "yes":
        return html(views.confirm(caller, title="Reset breakers",
                                  question=f"Reset {'breaker ' + name if name else 'every breaker'} to closed?",
                                  action="/admin/breakers/reset", fields={"name": name or ""},
                                  active="breakers"))  # fmt: skip
    names = await console_service.reset_breakers(
        db, caller, name=name, request_id=request_id(request)
    )
    return redirect(f"/admin/breakers?flash=Reset:+{len(names)}+breaker(s)")


@router.get("/caches")
async def caches_view(caller: CallerDep, runtime: RuntimeDep, flash: str = "") -> Response:
    csrf = caller.session.csrf
    rows = []
    for cache in (runtime.cache, identity_state(runtime).privileges.cache):
        s = cache.stats()
        ratio = s.get("hit_ratio")
        rows.append(
            (e(s["name"]), e(s.get("l1_entries")), e(s.get("hits_l1")), e(s.get("hits_l2")),
             e(s.get("misses_l1")), f"{ratio * 100:.1f} %" if ratio is not None else "–",
             form("/admin/caches/clear", csrf, "Clear…", fields={"name": s["name"]}))
        )  # fmt: skip
    body = table(["cache", "L1 entries", "L1 hits", "L2 hits", "L1 misses", "hit ratio", ""], rows,
                 table_id="caches") + form("/admin/caches/clear", csrf, "Clear all…")  # fmt: skip
    return html(page("Caches", body, caller, active="caches", flash=flash))


@router.post("/caches/clear")
async def caches_clear(
    request: Request, caller: CallerDep, db: SessionDep, runtime: RuntimeDep
) -> Response:
    fields = await posted(request, caller)
    name = first(fields, "name") or None
    if first(fields, "confirm") != "yes":
        return html(views.confirm(caller, title="Clear caches",
                                  question=f"Clear {'cache ' + name if name else 'every cache'} in every process?",
                                  action="/admin/caches/clear", fields={"name": name or ""},
                                  active="caches"))  # fmt: skip
    cleared = await console_service.clear_caches(
        db, runtime, caller, name=name, request_id=request_id(request)
    )
    return redirect(f"/admin/caches?flash=Cleared:+{'+'.join(cleared)}")


# ---- users, audit, alerts ----------------------------------------------------------------------
@router.get("/users")
async def users_view(
    caller: CallerDep,
    db: SessionDep,
    q: Annotated[str, Query(max_length=200)] = "",
    flash: str = "",
) -> Response:
    csrf = caller.session.csrf
    found = await console_service.users(db, search=q or None, limit=100)
    rows = [
        (e(u["email"]), e(u["role"]), e(u["plan"]), "yes" if u["mfa_enabled"] else "no",
         e(u["sessions"]), when(u["created_at"]),
         form(f"/admin/users/{u['id']}/revoke", csrf, "Revoke sessions…") if u["sessions"] else "")
        for u in found
    ]  # fmt: skip
    search = (
        '<form method="get" action="/admin/users" class="filters">'
        f'<input name="q" placeholder="e-mail contains" value="{e(q)}"><button>Search</button></form>'
    )
    body = search + table(
        ["e-mail", "role", "plan", "MFA", "sessions", "since", ""], rows, table_id="users"
    )
    return html(page("Users", body, caller, active="users", flash=flash))


@router.post("/users/{user_id}/revoke")
async def users_revoke(
    user_id: uuid.UUID, request: Request, caller: CallerDep, db: SessionDep, runtime: RuntimeDep
) -> Response:
    fields = await posted(request, caller)
    found = await console_service.user(db, user_id)
    if found is None:
        raise ConsoleError("No such user", status_code=404)
    if first(fields, "confirm") != "yes":
        return html(views.confirm(caller, title="Revoke sessions",
                                  question=f"Sign {found['email']} out of every device?",
                                  action=str(request.url.path), fields={}, active="users",
                                  count=int(found["sessions"])))  # fmt: skip
    n = await console_service.revoke_sessions(
        db, runtime, caller, user_id=user_id, request_id=request_id(request)
    )
    return redirect(f"/admin/users?flash=Revoked+{n}+session(s)")


def _moment(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value).astimezone() if value else None
    except ValueError:
        return None


@router.get("/audit")
async def audit_view(
    *,
    caller: CallerDep,
    db: SessionDep,
    actor: Annotated[str, Query(max_length=200)] = "",
    action: Annotated[str, Query(max_length=200)] = "",
    subject: Annotated[str, Query(max_length=300)] = "",
    since: Annotated[str, Query(max_length=40)] = "",
    until: Annotated[str, Query(max_length=40)] = "",
) -> Response:
    found = await console_service.audit_log(
        db, actor=actor or None, action=action or None, subject=subject or None,
        since=_moment(since), until=_moment(until), limit=200,
    )  # fmt: skip

    def change(value: Any) -> str:
        return f"<code>{e(orjson.dumps(value).decode())}</code>" if value else "–"

    rows = [
        (when(a["at"]), e(a["actor"] or a["actor_id"] or "system"), e(a["action"]),
         e(f"{a['subject_type']}:{a['subject_id']}"), change(a["before"]), change(a["after"]),
         e(a["request_id"]))
        for a in found
    ]  # fmt: skip
    filters = (
        '<form method="get" action="/admin/audit" class="filters" id="audit-filter">'
        f'<input name="actor" placeholder="actor e-mail" value="{e(actor)}">'
        f'<input name="action" placeholder="action (prefix)" value="{e(action)}">'
        f'<input name="subject" placeholder="type or type:id" value="{e(subject)}">'
        f'<input name="since" type="datetime-local" value="{e(since)}">'
        f'<input name="until" type="datetime-local" value="{e(until)}">'
        "<button>Filter</button></form>"
    )
    body = filters + table(["at", "actor", "action", "object", "before", "after", "request id"], rows,
                           table_id="audit")  # fmt: skip
    return html(page("Audit log", body, caller, active="audit"))


@router.get("/alerts")
async def alerts_view(caller: CallerDep, runtime: RuntimeDep) -> Response:
    state, history = await read_alerts(runtime)
    from surge.kit.telemetry.alerts import default_rules
    from surge.kit.telemetry.prometheus_rules import AlertThresholds

    rules = default_rules(thresholds=AlertThresholds.from_settings(runtime.settings))
    rows = []
    for rule in rules:
        s = state.get(rule.name, {})
        value = s.get("value")
        rows.append(
            (e(rule.name), e(rule.summary), e(f"{rule.threshold:g} {rule.unit}"),
             e(f"{value:.4g}" if isinstance(value, int | float) else "no data"),
             "🔥 firing" if s.get("firing") else "ok", e(rule.severity), e(s.get("detail", "")))
        )  # fmt: skip
    past = [
        (when(h["at"]), e(h["rule"]), e(h["status"]),
         e(f"{h['value']:.4g}" if isinstance(h.get("value"), int | float) else "–"), e(h["detail"]))
        for h in history
    ]  # fmt: skip
    body = (
        '<p class="hint">The same thresholds as <code>deploy/prometheus/alerts.yml</code> '
        "(generated from the settings, tested with promtool).</p>"
        + table(
            ["alert", "when", "threshold", "now", "state", "severity", "detail"],
            rows,
            table_id="alerts",
        )
        + "<h3>History</h3>"
        + table(["at", "alert", "status", "value", "detail"], past, table_id="alert-history")
    )
    return html(page("Alerts", body, caller, active="alerts"))
