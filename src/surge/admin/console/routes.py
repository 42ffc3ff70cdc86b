"""``/admin``: the operator's console (server-rendered pages, forms, SSE). Not part of the
JSON API: excluded from the OpenAPI document; errors render as console pages.

This module signs in (password, TOTP enrolment), serves the static files and the live
overview; each other area is a module of ``surge.admin.console.pages`` whose router is
included here."""

from __future__ import annotations

import asyncio
import contextlib
import io
import secrets
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import orjson
import segno
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from surge.admin.console import views
from surge.admin.console.pages import approvals as approval_pages
from surge.admin.console.pages import jobs as jobs_pages
from surge.admin.console.pages import keys as key_pages
from surge.admin.console.pages import operations as operation_pages
from surge.admin.console.pages import system as system_pages
from surge.admin.console.pages import withdrawals as withdrawal_pages
from surge.admin.console.session import (
    ADMIN_ROLES,
    COOKIE,
    PRE_COOKIE,
    ConsoleError,
    ConsoleSignInRequired,
    CrossSiteRefused,
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
from surge.admin.console.views import e, page
from surge.admin.console.web import HEADERS, STATIC, CallerDep, console_error, html, redirect
from surge.identity.devices import DEVICE_COOKIE, set_device_cookie
from surge.identity.errors import MfaRequired
from surge.identity.mfa import mfa as mfa_service
from surge.identity.runtime import identity_state
from surge.identity.service import identity as identity_service
from surge.kit.errors import SurgeError
from surge.kit.runtime import Runtime
from surge.kit.web.deps import RuntimeDep, SessionDep
from surge.kit.web.middleware import UNTIMED

__all__ = ["console_error", "router"]

router = APIRouter(prefix="/admin", include_in_schema=False)


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
            device_token=request.cookies.get(DEVICE_COOKIE),
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
    if pair.device_token:  # this browser is a trusted device for this account (ADR 0044)
        set_device_cookie(response, pair.device_token, runtime.settings, path="/admin/login")
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
        session.access = await mfa_service.verify(
            db, runtime, principal, first(fields, "code"),
            ip=identity_service.client_ip(runtime, request.scope),
        )  # fmt: skip
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


for _pages in (jobs_pages, withdrawal_pages, operation_pages, approval_pages, key_pages,
               system_pages):  # fmt: skip
    router.include_router(_pages.router)
