"""What every console page shares: the response headers, the signed-in caller, posted forms,
and how a console error renders."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import RedirectResponse, Response

from surge.admin.console import views
from surge.admin.console.session import (
    ADMIN_ROLES,
    Caller,
    ConsoleError,
    ConsoleSignInRequired,
    CrossSiteRefused,
    check_csrf,
    drop,
    first,
    load,
    principal_of,
    read_form,
    same_origin,
)
from surge.audit.approvals import ApprovalPending
from surge.kit.errors import SurgeError
from surge.kit.web.deps import RuntimeDep
from surge.kit.web.idempotency import fingerprint, idempotency_keys

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


def html(body: str, status: int = 200) -> Response:
    return Response(
        body, status_code=status, media_type="text/html; charset=utf-8", headers=HEADERS
    )


def redirect(to: str) -> Response:
    return RedirectResponse(to, status_code=303, headers=HEADERS)


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


async def once(
    request: Request,
    db: AsyncSession,
    caller: Caller,
    fields: dict[str, list[str]],
    run: Callable[[], Awaitable[Response]],
    *,
    replayed: str,
) -> Response:
    """A confirmed form that moves money takes effect once per rendered form: the
    confirmation page carries a fresh ``form_key`` (``views.confirm``), claimed here as an
    Idempotency-Key in the action's own transaction. A double-click, a resubmitted page or
    the back button's re-post finds the key taken: a redirect answers it to ``replayed``
    (or the first result page is shown again), never a second effect."""
    key = first(fields, views.FORM_KEY)
    if not key:
        raise ConsoleError("This form has expired; open the page again.", status_code=428)
    scope = f"console:{caller.principal.user_id}"
    stored = await idempotency_keys.claim(
        db, scope=scope, key=key, fingerprint=fingerprint("POST", request.url.path, b"")
    )
    if stored is not None:
        if 300 <= stored.status_code < 400:
            return redirect(replayed)
        return html(stored.body.decode("utf-8", errors="replace"), stored.status_code)
    response = await run()
    await idempotency_keys.store(db, scope=scope, key=key, response=response)
    return response


async def answered(caller: Caller, action: Callable[[], Awaitable[Response]]) -> Response:
    """``action()``'s page, or, when the owning domain refuses the action (any
    ``SurgeError``: not found, a conflict, a rule), the console's error page with the
    refusal's status (an action recorded for a second administrator: the approvals page): the one way a console action shows a refusal. The console's own
    errors (sign-in, CSRF, forbidden) pass through to ``console_error``."""
    try:
        return await action()
    except ConsoleError:
        raise
    except ApprovalPending as pending:  # recorded: a second administrator decides (ADR 0059)
        return redirect(f"/admin/approvals?flash={quote(pending.message)}")
    except SurgeError as error:
        return html(views.error_page(error.status_code, error.message, caller), error.status_code)


async def console_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ConsoleError)
    if isinstance(error, ConsoleSignInRequired) and request.method == "GET":
        return redirect("/admin")
    return html(views.error_page(error.status_code, error.message, None), error.status_code)
