"""RFC 9457 ``application/problem+json`` for every error a client can see.

One renderer (``problem_response``) and the exception handlers that route Surge errors,
Starlette's HTTP errors (404, 405), payload validation (422) and database outages (503)
through it; database errors that are the caller's input (unstorable text → 422) or a lost
race (deadlock, serialization failure → 503 + Retry-After, nothing written) too. An
unexpected exception never reaches here: ``SurgeMiddleware`` turns it into a
bare 500 without detail (the stack trace goes to the log, with the request id).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Send

from surge.kit.db import (
    CONCURRENCY_SQLSTATES,
    OUT_OF_RANGE_SQLSTATES,
    TIMEOUT_SQLSTATES,
    UNSTORABLE_TEXT_SQLSTATES,
    is_pool_exhausted,
    is_unavailable,
    sqlstate,
)
from surge.kit.errors import SurgeError

log = structlog.get_logger()

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://surge.dev/problems/"
_PROBLEM_JSON_BYTES = PROBLEM_JSON.encode()


def problem_body(
    status: int,
    *,
    title: str | None = None,
    detail: str | None = None,
    type_: str | None = None,
    instance: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "type": TYPE_BASE + type_ if type_ else "about:blank",
        "title": title or _phrase(status),
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    return orjson.dumps(body, default=str)


async def send_problem(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Answer ``body`` (``problem_body``) straight on ASGI's ``send``, for the layers that
    answer before or around the app (its exception handlers never see them): the
    content type and length, then ``headers``."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", _PROBLEM_JSON_BYTES),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_response(
    status: int,
    *,
    detail: str | None = None,
    title: str | None = None,
    type_: str | None = None,
    request: Request | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    return Response(
        problem_body(
            status,
            title=title,
            detail=detail,
            type_=type_,
            instance=request.url.path if request is not None else None,
            extra=extra,
        ),
        status_code=status,
        headers=dict(headers or {}),
        media_type=PROBLEM_JSON,
    )


def problem_title(error: SurgeError) -> str:
    """The ``title`` for ``error``: its class's own, unless that title was written for
    another status (a subclass that sets only ``status_code`` inherits "Internal Server
    Error" from ``SurgeError``; a status given at construction overrides the class's): then
    the status's standard phrase. A title always describes the status sent with it."""
    definer = next(k for k in type(error).__mro__ if "title" in vars(k))
    if getattr(definer, "status_code", None) == error.status_code:
        return error.title
    return _phrase(error.status_code)


async def _surge_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, SurgeError)
    return problem_response(
        error.status_code,
        detail=error.message,
        title=problem_title(error),
        type_=error.type_slug,
        request=request,
        headers=error.headers,
        extra=error.extra,
    )


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    detail: str | None = error.detail if isinstance(error.detail, str) else None
    if detail == _phrase(error.status_code):
        detail = None
    headers = dict(error.headers or {})
    if error.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return problem_response(error.status_code, detail=detail, request=request, headers=headers)


def _allowed_methods(request: Request) -> str:
    """``Allow`` for a 405: every method of every route on this path. Starlette lists only
    the first route that matched the path, so ``GET /x`` and ``POST /x`` declared apart
    (the usual FastAPI way) would answer ``Allow: GET`` to a ``PUT`` (RFC 9110 §15.5.6)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


#: ``app.state`` attribute: an async check that runs before a 422 is answered (the API's
#: authentication: a protected route answers 401/403 to a bad body, not 422).
VALIDATION_GUARD = "validation_guard"


async def _validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    guard = getattr(request.app.state, VALIDATION_GUARD, None)
    if guard is not None:
        try:
            await guard(request)
        except SurgeError as refused:
            return await _surge_error(request, refused)
    errors = [
        {"loc": list(item.get("loc", ())), "msg": item.get("msg"), "type": item.get("type")}
        for item in error.errors()
    ]
    return problem_response(
        422,
        title="Unprocessable Content",
        detail="The request is not valid; see `errors`.",
        type_="validation",
        request=request,
        extra={"errors": errors},
    )


async def _database_error(request: Request, error: Exception) -> Response:
    state = sqlstate(error)
    if state in CONCURRENCY_SQLSTATES:  # lost a race (deadlock...): rolled back whole
        log.warning("db.concurrency_conflict", sqlstate=state, path=request.url.path)
        return problem_response(
            503,
            detail="The request collided with a concurrent one; nothing was written. Retry.",
            type_="concurrent-update",
            request=request,
            headers={"Retry-After": "1"},
        )
    if state in TIMEOUT_SQLSTATES:  # too slow now: rolled back whole, worth a retry
        log.warning("db.statement_timeout", path=request.url.path)
        return problem_response(
            503,
            detail="The database is too slow right now; nothing was written. Retry shortly.",
            type_="busy",
            request=request,
            headers={"Retry-After": "2"},
        )
    if state in UNSTORABLE_TEXT_SQLSTATES or state in OUT_OF_RANGE_SQLSTATES:
        detail = (
            "A text field holds a character that cannot be stored (such as NUL)."
            if state in UNSTORABLE_TEXT_SQLSTATES
            else "A value is out of the range that can be stored (a number or a date)."
        )
        return problem_response(
            422, title="Unprocessable Content", detail=detail, type_="validation", request=request
        )
    if is_pool_exhausted(error):  # busy, not down: never logged or reported as an outage
        log.warning("db.pool_exhausted", path=request.url.path)
        return problem_response(
            503,
            detail="The server is busy; nothing was written. Retry shortly.",
            type_="busy",
            request=request,
            headers={"Retry-After": "1"},
        )
    if is_unavailable(error):
        log.warning("db.unavailable", error=str(error)[:300])
        return problem_response(
            503,
            detail="The database is unavailable; nothing was written. Retry shortly.",
            type_="dependency-unavailable",
            request=request,
            headers={"Retry-After": "5"},
        )
    raise error  # a real bug: let SurgeMiddleware answer 500 and log it


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
    "required": ["type", "title", "status"],
    "additionalProperties": True,
}


def _document_problems(app: FastAPI) -> None:
    """Every operation's OpenAPI ``default`` response: an ``application/problem+json`` body
    (401, 403, 404, 409, 413, 429, 503... are all answered that way; listing each status on
    each route would say the same thing forty times)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
            "Problem", PROBLEM_SCHEMA
        )
        default = {
            "description": "An error, as RFC 9457 problem details.",
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict) and "responses" in operation:
                    operation["responses"].setdefault("default", default)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_problem_handlers(app: FastAPI) -> None:
    _document_problems(app)
    app.add_exception_handler(SurgeError, _surge_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeoutError, _database_error)
    app.add_exception_handler(ConnectionError, _database_error)
    app.add_exception_handler(TimeoutError, _database_error)
