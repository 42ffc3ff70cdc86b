"""``/admin``: the operator's console (server-rendered pages, forms, SSE). Not part of the
JSON API: excluded from the OpenAPI document; errors render as console pages."""

from __future__ import annotations

import asyncio
import contextlib
import io
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

import orjson
import segno
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from surge.admin.console import views
from surge.admin.console.service import console as console_service
from surge.admin.console.session import (
    ADMIN_ROLES,
    COOKIE,
    PRE_COOKIE,
    Caller,
    ConsoleError,
    ConsoleSignInRequired,
    CrossSiteRefused,
    as_dict,
    check_csrf,
    drop,
    first,
    load,
    new_session,
    principal_of,
    read_form,
    same_origin,
    save,
    set_cookie,
)
from surge.admin.console.timeseries import read_alerts, read_series
from surge.admin.console.views import e, form, money, page, table, when
from surge.identity.errors import MfaRequired
from surge.identity.mfa import mfa as mfa_service
from surge.identity.runtime import identity_state
from surge.identity.service import identity as identity_service
from surge.kit.breaker import breakers
from surge.kit.errors import SurgeError
from surge.kit.jobs.queue import JobFilter, get_job, list_jobs, paused_queues, queue_stats
from surge.kit.runtime import Runtime
from surge.kit.web.deps import RuntimeDep, SessionDep
from surge.kit.web.middleware import UNTIMED
from surge.wallet.service import wallet as wallet_service

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}

router = APIRouter(prefix="/admin", include_in_schema=False)


def html(body: str, status: int = 200) -> Response:
    return Response(
        body, status_code=status, media_type="text/html; charset=utf-8", headers=HEADERS
    )


def redirect(to: str) -> Response:
    return RedirectResponse(to, status_code=303, headers=HEADERS)


def _rid(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def current_caller(request: Request, runtime: RuntimeDep) -> Caller:
    session = await load(runtime, request)
    if session is None or session.stage != "ready":
        raise ConsoleSignInRequired("Sign in to the console")
    principal = await principal_of(runtime, session)
    if principal is None or principal.role not in ADMIN_ROLES or not principal.mfa:
        await drop(runtime, session)
        raise ConsoleSignInRequired("Your console session ended; sign in again")
    return Caller(session, principal)


CallerDep = Annotated[Caller, Depends(current_caller)]


async def posted(request: Request, caller: Caller) -> dict[str, list[str]]:
    """A console form: same origin, right CSRF token."""
    if not same_origin(request):
        raise CrossSiteRefused("Cross-site form posts are refused")
    fields = await read_form(request)
    check_csrf(caller.session.csrf, fields)
    return fields


async def console_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ConsoleError)
    if isinstance(error, ConsoleSignInRequired) and request.method == "GET":
        return redirect("/admin")
    return html(views.error_page(error.status_code, error.message, None), error.status_code)


# ---- sign-in and MFA enrolment ---------------------------------------------------------------
@router.get("")
async def home(request: Request, runtime: RuntimeDep) -> Response:
    session = await load(runtime, request)
    if session is not None:
        if session.stage == "ready" and await principal_of(runtime, session):
            return redirect("/admin/overview")
        if session.stage == "enrol":
            return html(views.enrol(session.csrf, session.email))
    token = secrets.token_urlsafe(24)
    response = html(views.sign_in(token))
    set_cookie(response, PRE_COOKIE, token, runtime)
    return response


@router.post("/login")
async def login(request: Request, runtime: RuntimeDep, db: SessionDep) -> Response:
    if not same_origin(request):
        raise CrossSiteRefused("Cross-site form posts are refused")
    fields = await read_form(request)
    check_csrf(request.cookies.get(PRE_COOKIE, ""), fields)
    email, password, otp = first(fields, "email"), first(fields, "password"), first(fields, "otp")
    retry = secrets.token_urlsafe(24)

    def again(message: str, *, need_otp: bool = False, status: int = 401) -> Response:
        response = html(views.sign_in(retry, error=message, need_otp=need_otp), status)
        set_cookie(response, PRE_COOKIE, retry, runtime)
        return response

    try:
        pair = await identity_service.login(
            db,
            runtime,
            email=email,
            password=password,
            otp=otp or None,
            ip=identity_service.client_ip(runtime, request.scope),
            user_agent=request.headers.get("user-agent"),
        )
    except MfaRequired:
        return again("Enter the one-time code of your authenticator app.", need_otp=True)
    except SurgeError as error:
        return again(error.message, status=error.status_code)
    principal = identity_state(runtime).principal_of(pair.access_token)
    if principal.role not in ADMIN_ROLES:
        with contextlib.suppress(SurgeError):
            await identity_service.logout(db, runtime, principal)
        return again("This account is not an administrator.", status=403)
    stage = "ready" if principal.mfa else "enrol"
    session = new_session(pair.access_token, pair.refresh_token, email, stage)
    await save(runtime, session)
    response = redirect("/admin/overview" if stage == "ready" else "/admin")
    set_cookie(response, COOKIE, session.id, runtime)
    response.delete_cookie(PRE_COOKIE, path="/admin")
    return response


async def _enrolling(request: Request, runtime: Runtime) -> Any:
    session = await load(runtime, request)
    if session is None or session.stage != "enrol":
        raise ConsoleSignInRequired("Sign in first")
    if not same_origin(request):
        raise CrossSiteRefused("Cross-site form posts are refused")
    fields = await read_form(request)
    check_csrf(session.csrf, fields)
    principal = await principal_of(runtime, session)
    if principal is None:
        raise ConsoleSignInRequired("Sign in again")
    return session, principal, fields


def _qr(uri: str) -> str:
    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="svg", scale=4, xmldecl=False, svgns=True, border=2)
    return out.getvalue().decode()


@router.post("/mfa/setup")
async def mfa_setup(request: Request, runtime: RuntimeDep, db: SessionDep) -> Response:
    session, principal, _ = await _enrolling(request, runtime)
    enrollment = await mfa_service.setup(db, runtime, principal)
    return html(
        views.enrol(
            session.csrf,
            session.email,
            qr_svg=_qr(enrollment.provisioning_uri),
            secret=enrollment.secret,
            codes=enrollment.backup_codes,
        )
    )


@router.post("/mfa/verify")
async def mfa_verify(request: Request, runtime: RuntimeDep, db: SessionDep) -> Response:
    session, principal, fields = await _enrolling(request, runtime)
    try:
        session.access = await mfa_service.verify(db, runtime, principal, first(fields, "code"))
    except SurgeError as error:
        return html(
            views.page(
                "Second factor",
                f'<div class="card"><p class="error" id="error">{e(error.message)}</p>'
                "<p>Start again: <a href=/admin>set up the second factor</a>.</p></div>",
                None,
            ),
            error.status_code,
        )
    session.stage = "ready"
    await save(runtime, session)
    return redirect("/admin/overview?flash=Second+factor+enabled")


@router.post("/logout")
async def logout(request: Request, runtime: RuntimeDep, db: SessionDep) -> Response:
    session = await load(runtime, request)
    if session is not None:
        if not same_origin(request):
            raise CrossSiteRefused("Cross-site form posts are refused")
        check_csrf(session.csrf, await read_form(request))
        principal = await principal_of(runtime, session)
        if principal is not None:
            with contextlib.suppress(SurgeError):
                await identity_service.logout(db, runtime, principal)
        await drop(runtime, session)
    response = redirect("/admin")
    response.delete_cookie(COOKIE, path="/admin")
    return response


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        raise ConsoleError("No such file", status_code=404)
    body = resources.files("surge.admin.console").joinpath(f"static/{name}").read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})


# ---- overview --------------------------------------------------------------------------------
def _thresholds(runtime: Runtime) -> dict[str, float]:
    s = runtime.settings
    return {
        "p95_ms": s.ALERT_RESPONSE_P95.total_seconds() * 1000,
        "error_ratio": s.ALERT_ERROR_RATIO,
        "hit_ratio": s.ALERT_CACHE_HIT_RATIO,
    }


async def _charts(runtime: Runtime) -> str:
    points = await read_series(runtime, since=time.time() - 3600)
    return views.overview_charts(points, _thresholds(runtime))


@router.get("/overview")
async def overview(caller: CallerDep, runtime: RuntimeDep, flash: str = "") -> Response:
    firing, _ = await read_alerts(runtime)
    now_firing = [name for name, state in firing.items() if state.get("firing")]
    banner = (
        f'<p class="alert" id="firing">Firing: {e(", ".join(now_firing))} — '
        '<a href="/admin/alerts">alerts</a></p>'
        if now_firing
        else ""
    )
    body = banner + '<p class="hint">Last hour, live (updates over SSE).</p>'
    body += await _charts(runtime)
    return html(page("Overview", body, caller, active="overview", flash=flash))


@router.get("/fragments/charts")
async def charts_fragment(caller: CallerDep, runtime: RuntimeDep) -> Response:
    return html(await _charts(runtime))


@router.get("/events")
async def events(caller: CallerDep, runtime: RuntimeDep, request: Request) -> Response:
    """Server-sent events: one ``tick`` per new point. The stream ends after 20 s (under the
    request timeout) and the browser's EventSource reconnects by itself."""
    interval = runtime.settings.CONSOLE_SAMPLE_INTERVAL.total_seconds()
    request.scope[UNTIMED] = True  # its 20 s are not a response time

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        last = 0.0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return
            points = await read_series(runtime, since=last + 0.001 if last else time.time() - 60)
            if points:
                last = float(points[-1]["t"])
                yield b"event: tick\ndata: " + orjson.dumps(points[-1]) + b"\n\n"
            await asyncio.sleep(min(interval, 2.0))

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={**HEADERS, "X-Accel-Buffering": "no"}
    )


# ---- jobs ------------------------------------------------------------------------------------
def _filter(queue: str, state: str, name: str, search: str) -> JobFilter:
    return JobFilter(
        queue=queue or None, state=state or None, name=name or None, search=search or None
    )


@router.get("/jobs")
async def jobs(
    *,
    caller: CallerDep,
    db: SessionDep,
    queue: Annotated[str, Query(max_length=100)] = "",
    state: Annotated[str, Query(max_length=20)] = "",
    name: Annotated[str, Query(max_length=200)] = "",
    search: Annotated[str, Query(max_length=200)] = "",
    flash: str = "",
) -> Response:
    csrf = caller.session.csrf
    paused = await paused_queues(db)
    stats = {s.queue: s for s in await queue_stats(db)}
    queues = sorted(set(stats) | set(paused) | ({queue} if queue else set()))
    queue_rows = []
    for q in queues:
        s = stats.get(q)
        is_paused = q in paused
        toggle = form(
            f"/admin/jobs/queues/{q}/{'resume' if is_paused else 'pause'}", csrf,
            "Resume" if is_paused else "Pause", button_id=f"{'resume' if is_paused else 'pause'}-{q}",
        )  # fmt: skip
        queue_rows.append(
            (e(q), "⏸ paused" if is_paused else "running", e(s.ready if s else 0),
             e(s.active if s else 0), e(f"{s.oldest_age_seconds:.1f} s" if s else "0 s"), toggle)
        )  # fmt: skip
    flt = _filter(queue, state, name, search)
    found = await list_jobs(db, flt, limit=100)
    states = ["", "queued", "active", "succeeded", "failed", "cancelled"]
    options = "".join(
        f'<option value="{s}"{" selected" if s == state else ""}>{s or "any state"}</option>'
        for s in states
    )
    filter_form = (
        '<form method="get" action="/admin/jobs" class="filters" id="job-filter">'
        f'<input name="queue" placeholder="queue" value="{e(queue)}">'
        f'<select name="state">{options}</select>'
        f'<input name="name" placeholder="job name" value="{e(name)}">'
        f'<input name="search" placeholder="payload or error contains" value="{e(search)}">'
        "<button>Filter</button></form>"
    )
    kept = {"queue": queue, "state": state, "name": name, "search": search}
    bulk = "".join(
        form("/admin/jobs/bulk", csrf, label, fields={**kept, "action": action},
             button_id=f"bulk-{action}")
        for action, label in (("retry", "Retry matching…"), ("cancel", "Cancel matching…"),
                              ("delete", "Delete matching…"))
    )  # fmt: skip
    rows = [
        (f'<a href="/admin/jobs/{j.id}">{j.id}</a>', e(j.queue), e(j.name), e(j.state),
         e(j.attempts), when(j.finished_at or j.run_at), e((j.last_error or "")[:120]))
        for j in found
    ]  # fmt: skip
    body = (
        "<h3>Queues</h3>"
        + table(["queue", "state", "ready", "running", "lag", ""], queue_rows, table_id="queues")
        + "<h3>Jobs</h3>"
        + filter_form
        + f'<div class="bulk">{bulk}</div>'
        + table(
            ["id", "queue", "job", "state", "attempts", "at", "last error"], rows, table_id="jobs"
        )
    )
    return html(page("Jobs", body, caller, active="jobs", flash=flash))


@router.get("/jobs/{job_id}")
async def job_detail(caller: CallerDep, db: SessionDep, job_id: int) -> Response:
    job = await get_job(db, job_id)
    if job is None:
        raise ConsoleError(f"No job {job_id}", status_code=404)
    facts = [
        ("queue", e(job.queue)), ("job", e(job.name)), ("state", e(job.state)),
        ("attempts", f"{job.attempts} of {job.max_attempts or 'default'}"),
        ("stalls", e(job.stalls)), ("created", when(job.created_at)), ("run at", when(job.run_at)),
        ("started", when(job.started_at)), ("finished", when(job.finished_at)),
        ("worker", e(job.worker)), ("dedup key", e(job.dedup_key)),
        ("payload", f"<pre>{e(orjson.dumps(job.payload, option=orjson.OPT_INDENT_2).decode())}</pre>"),
        ("last error", f"<pre id=last-error>{e(job.last_error or '–')}</pre>"),
    ]  # fmt: skip
    actions = ""
    filt = {"job_id": str(job.id)}
    if job.state in {"failed", "cancelled"}:
        actions += form(
            "/admin/jobs/bulk", caller.session.csrf, "Retry…", fields={**filt, "action": "retry"}
        )
    if job.state == "queued":
        actions += form(
            "/admin/jobs/bulk", caller.session.csrf, "Cancel…", fields={**filt, "action": "cancel"}
        )
    body = table(["", ""], facts) + actions
    return html(page(f"Job {job.id}", body, caller, active="jobs"))


@router.post("/jobs/queues/{queue}/{verb}")
async def queue_toggle(
    queue: str, verb: str, request: Request, caller: CallerDep, db: SessionDep
) -> Response:
    fields = await posted(request, caller)
    if verb not in {"pause", "resume"}:
        raise ConsoleError("Unknown action", status_code=404)
    if first(fields, "confirm") != "yes":
        question = (
            f"Pause queue {queue}? Workers stop taking its jobs (running ones finish)."
            if verb == "pause"
            else f"Resume queue {queue}? Workers take its jobs again."
        )
        return html(views.confirm(caller, title=f"{verb.title()} a queue", question=question,
                                  action=str(request.url.path), fields={}, active="jobs"))  # fmt: skip
    await console_service.set_queue_paused(
        db, caller, queue=queue, paused=verb == "pause", request_id=_rid(request)
    )
    done = "paused" if verb == "pause" else "resumed"
    return redirect(f"/admin/jobs?queue={quote(queue)}&flash=Queue+{quote(queue)}+{done}")


@router.post("/jobs/bulk")
async def jobs_bulk(request: Request, caller: CallerDep, db: SessionDep) -> Response:
    fields = await posted(request, caller)
    action = first(fields, "action")
    job_id = first(fields, "job_id")
    flt = _filter(
        first(fields, "queue"),
        first(fields, "state"),
        first(fields, "name"),
        first(fields, "search"),
    )
    if job_id.isdigit():
        flt = JobFilter(job_id=int(job_id))
    count = await console_service.job_count(db, action=action, flt=flt)
    if first(fields, "confirm") != "yes":
        return html(
            views.confirm(
                caller, title=f"{action.title()} jobs",
                question=f"{action.title()} every {'' if job_id else 'matching '}job"
                f"{' ' + job_id if job_id else ' (' + _describe(flt) + ')'}?",
                action="/admin/jobs/bulk", fields=as_dict(fields), active="jobs", count=count,
                danger=action == "delete",
            )
        )  # fmt: skip
    changed = await console_service.job_bulk(
        db, caller, action=action, flt=flt, expected=int(first(fields, "expected", "0") or 0),
        request_id=_rid(request),
    )  # fmt: skip
    return redirect(f"/admin/jobs?flash={action.title()}:+{changed}+job(s)")


def _describe(flt: JobFilter) -> str:
    return ", ".join(f"{k} = {v}" for k, v in flt.__dict__.items() if v) or "all jobs"


# ---- withdrawals -----------------------------------------------------------------------------
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
            balances[item["owner_id"]] = await wallet_service.balance(db, runtime, item["owner_id"])
    rows = []
    for w in items:
        b = balances.get(w["owner_id"])
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
        ["partner", "amount", "requested", "balance", "available", "status", ""],
        rows,
        table_id="withdrawals",
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
    try:
        await console_service.decide_withdrawal(
            db, runtime, caller, withdrawal_id=withdrawal_id, approve=verb == "approve",
            reason=reason, request_id=_rid(request),
        )  # fmt: skip
    except ConsoleError:
        raise
    except SurgeError as error:
        return html(views.error_page(error.status_code, error.message, caller), error.status_code)
    done = "approved" if verb == "approve" else "rejected"
    return redirect(f"/admin/withdrawals?flash=Withdrawal+{done}")


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
    results = await console_service.batch_approve(
        db, runtime, caller, ids=ids, request_id=_rid(request)
    )
    return html(
        views.results(
            caller, "Batch approval", [(r.id, r.ok, r.detail) for r in results], "withdrawals"
        )
    )


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
    names = await console_service.reset_breakers(db, caller, name=name, request_id=_rid(request))
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
        db, runtime, caller, name=name, request_id=_rid(request)
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
        db, runtime, caller, user_id=user_id, request_id=_rid(request)
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
