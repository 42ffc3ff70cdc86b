"""``SurgeMiddleware``: the one pure-ASGI layer every HTTP request passes through.

One class instead of five ``BaseHTTPMiddleware`` layers because each Starlette layer costs a
task and a copy per request (the ``ping`` benchmark measures what this one costs); in the
assembled app it is the only layer around the app's own middleware (``kit.web.stack``, ADR
0029). In order:

0. admission (``admission=``): a request that waited too long or finds the process full is
   refused with a pre-rendered 503 before anything below (ADR 0016);
1. correlation id: ``X-Request-ID`` (if sane) or the trace id of a W3C ``traceparent``, else a
   new one; bound into the log context, echoed as ``X-Request-ID``;
2. body limit: a ``Content-Length`` above the limit is refused with 413 before reading; a
   chunked body is counted as it streams and cut at the limit;
3. timeout: the request is cancelled after ``timeout`` seconds and answered 504;
4. RED metrics by route *template* (``/api/v1/orders/{id}``, never the raw path), recorded
   by the matched route object and read as a template once a second;
5. an exception raised outside a route goes to its handler (``exception_handlers=``, as
   Starlette's ``ExceptionMiddleware`` would); any exception without one is logged with its
   traceback and answered with a bare 500 problem (no detail to the client);
6. ``Server-Timing`` (when ``server_timing``): ``app;dur=`` is the time from this layer's
   start to the response's first byte, and ``queue;dur=`` the time from the client's
   ``X-Request-Start: t=<epoch µs>`` (when sent; clamped at 0) to this layer's start — the
   accept queue, the event loop's backlog and parsing. ``surge load`` joins both with the
   latency it measured from each request's due time (ADR 0015).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import re
import time
from collections.abc import Awaitable
from threading import get_ident
from time import perf_counter
from typing import Any

import structlog
from starlette._exception_handler import ExceptionHandlers, StatusHandlers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from surge.kit.telemetry import metrics
from surge.kit.web.admission import Admission, Refusal, refuse
from surge.kit.web.admission import request_start as _request_start
from surge.kit.web.errors import FileStack, handle_exception
from surge.kit.web.problem import problem_body, send_problem

log = structlog.get_logger()

#: Scope key of a list of extra response headers: inner layers (the rate limiter) append to
#: it and ``SurgeMiddleware`` adds them to the response it already wraps, instead of each
#: layer wrapping ``send`` again (one closure and two awaits less per request).
RESPONSE_HEADERS = "surge.response_headers"

_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
UNMATCHED = metrics.UNMATCHED
_task_of = asyncio.current_task
#: The request headers ``SurgeMiddleware`` reads.
_READ = frozenset(
    (b"content-length", b"x-request-id", b"traceparent", b"transfer-encoding", b"x-request-start")
)


class BodyTooLarge(BaseException):
    """Raised from ``receive`` when a streamed body passes the limit.

    A ``BaseException`` on purpose: FastAPI turns any ``Exception`` raised while parsing a
    body into a 400, and this must reach ``SurgeMiddleware`` to become a 413."""


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's ``X-Request-ID`` (if sane) or a ``traceparent``'s trace id, else a new id."""
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_ID.match(candidate):
                return candidate
        elif name == b"traceparent":
            match = _TRACEPARENT.match(value.decode("latin-1"))
            if match:
                return match.group(1)
    return new_request_id()


class _Ids:
    """Request ids without a system call per request: 64 random bits drawn once per process
    (again after a fork) and a 64-bit counter, as 32 hex digits like a trace id.
    ``os.urandom(16)`` per request was a ``getrandom`` syscall on the hot path (ADR 0023)."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _Ids()

#: structlog's own context variable for ``request_id`` (what ``bind_contextvars`` sets), set
#: directly: ``clear_contextvars`` + ``bind_contextvars`` copied the whole context and
#: scanned it on every request (~3 µs, ADR 0023). Each request runs in a task of its own, so
#: whatever a handler binds dies with that task.
_REQUEST_ID_VAR: contextvars.ContextVar[Any] = structlog.contextvars.bind_contextvars(
    request_id=...
)["request_id"].var


class SurgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        body_limit: int = 1024 * 1024,
        timeout: float = 30.0,
        slow_request: float = 1.0,
        access_log: bool = False,
        server_timing: bool = True,
        admission: Admission | None = None,
        exception_handlers: tuple[ExceptionHandlers, StatusHandlers] | None = None,
    ) -> None:
        """``admission``: the door, checked first (``Admission.enter``) instead of a layer of
        its own. ``exception_handlers``: this layer also does what Starlette's
        ``ExceptionMiddleware`` and FastAPI's ``AsyncExitStackMiddleware`` do (the handlers
        in the scope for the routes, an exception raised outside a route sent to its
        handler, the upload files' exit stack), so ``kit.web.stack`` can drop those layers
        (ADR 0029)."""
        self.app = app
        self.admission = admission
        self.exception_handlers = exception_handlers
        self.body_limit = body_limit
        self.timeout = timeout
        self.slow_request = slow_request
        self.access_log = access_log
        #: A request is logged when it took this long (every one with the access log on),
        #: or when it failed (5xx).
        self._log_above = 0.0 if access_log else slow_request
        self.server_timing = server_timing
        # Request deadlines (``time.perf_counter`` seconds), swept by one task, instead of
        # one asyncio.timeout per request: asyncio.timeout costs ~6 µs per request under
        # uvloop, a dict insert ~0.1 µs.
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_every = max(0.01, min(0.25, timeout / 4))
        # The event loop this layer last ran in, and its thread: see ``_current_task``.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def _current_task(self) -> asyncio.Task[Any]:
        """The running task, without ``asyncio.current_task()``'s ``get_running_loop()``:
        on Python 3.11 that compares ``getpid()`` with the loop's pid, a system call on
        every request that a bare app never makes (ADR 0049). The loop is remembered with
        its thread; only one loop runs in a thread at a time and a loop that is not running
        has no current task, so a stale loop (a test's previous one) answers None and is
        replaced."""
        task = asyncio.current_task(self._loop) if self._loop_thread == get_ident() else None
        if task is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = get_ident()
            task = asyncio.current_task(self._loop)
            assert task is not None
        return task

    async def _sweep(self) -> None:
        # Sleep first, and stop only when a whole period found nothing to watch. Checking
        # before the first sleep made the sweeper end at once whenever the request that
        # started it had already finished (a ``/livez`` answers within the loop iteration
        # that starts it, before the new task's first step): every such request then
        # created a task (~2 µs of CPU in process at one request per iteration; ADR 0049).
        while True:
            await asyncio.sleep(self._sweep_every)
            if not self._deadlines:
                return
            now = time.perf_counter()
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now:
                    self._deadlines.pop(task, None)  # the sweeper removed it if it expired
                    self._expired.add(task)
                    task.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if self.exception_handlers is not None and scope["type"] == "websocket":
                scope["starlette.exception_handlers"] = self.exception_handlers
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        # One pass over the headers for everything this layer reads (it was four).
        request_id: str | None = None
        declared: int | None = None
        chunked = False
        stamp: bytes | None = None
        # One set lookup per header, not five comparisons: most are none of these.
        for name, value in scope["headers"]:
            if name not in _READ:
                continue
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
            elif name == b"x-request-id":
                if request_id is None:
                    candidate = value.decode("latin-1")
                    if _SANE_ID.match(candidate):
                        request_id = candidate
            elif name == b"traceparent":
                if request_id is None:
                    match = _TRACEPARENT.match(value.decode("latin-1"))
                    if match:
                        request_id = match.group(1)
            elif name == b"transfer-encoding":
                chunked = True
            else:  # x-request-start
                stamp = value
        request_start = _request_start(stamp) if stamp is not None else None
        admission = self.admission
        counted = False
        if admission is not None:
            verdict = admission.enter(scope["path"], request_start)
            if isinstance(verdict, Refusal):
                await refuse(send, verdict)  # before any other work (ADR 0016)
                return
            counted = verdict
        if request_id is None:
            request_id = f"{new_request_id.prefix}{next(new_request_id.counter):016x}"
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["request_id"] = request_id
        _REQUEST_ID_VAR.set(request_id)
        id_header = (b"x-request-id", request_id.encode())
        extra: list[tuple[bytes, bytes]] = []
        scope[RESPONSE_HEADERS] = extra
        handlers = self.exception_handlers
        files: FileStack | None = None
        if handlers is not None:
            # What ExceptionMiddleware and AsyncExitStackMiddleware put in the scope.
            scope["starlette.exception_handlers"] = handlers
            files = scope["fastapi_middleware_astack"] = FileStack()
        # The status sent, 0 until the response starts (then the answer is the app's).
        sent = 0
        timing = self.server_timing
        queue_ms = (
            max(0.0, (time.time() - request_start) * 1000)
            if timing and request_start is not None
            else None
        )

        def send_wrapper(message: Message) -> Awaitable[None]:
            # A plain function handing back the inner ``send``'s awaitable: no coroutine of
            # its own per message (ADR 0061). The body passes straight through (ADR 0056).
            nonlocal sent
            if sent or message["type"] != "http.response.start":
                return send(message)
            sent = message["status"]
            if timing:
                app_ms = (perf_counter() - started) * 1000
                message["headers"] = [
                    *message.get("headers", ()),
                    id_header,
                    *extra,
                    (b"server-timing", b"app;dur=%.2f" % app_ms)
                    if queue_ms is None
                    else (b"server-timing", b"queue;dur=%.2f, app;dur=%.2f" % (queue_ms, app_ms)),
                ]
            else:
                message["headers"] = [*message.get("headers", ()), id_header, *extra]
            return send(message)

        limit = self.body_limit
        if declared is not None or (not chunked and scope.get("http_version", "1.1")[0] == "1"):
            # The server frames the body by its Content-Length (checked against the limit
            # below), or an HTTP/1 request without either header has no body at all: no
            # need to count what ``receive`` hands over.
            inner_receive = receive
        else:
            received = 0

            async def receive_wrapper() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge
                return message

            inner_receive = receive_wrapper

        recorder = metrics.REQUESTS
        recorder.started()
        # The running task (its deadline's key) without ``asyncio.current_task()``'s getpid
        # (``_current_task``); the method call only when the loop changed.
        task = _task_of(self._loop) if self._loop_thread == get_ident() else None
        if task is None:
            task = self._current_task()
        deadlines = self._deadlines
        deadlines[task] = started + self.timeout
        sweeper = self._sweeper
        if sweeper is None or sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="request-deadlines")
        # What is recorded: the status sent through ``send_wrapper`` (see ``finally``), else
        # the answer this layer sent itself, else 500 (no answer at all).
        status = 500
        try:
            if declared is not None and declared > limit:
                status = 413
                await _send_problem(
                    send, 413, id_header, detail=f"The request body exceeds {limit} bytes."
                )
                return
            await self.app(scope, inner_receive, send_wrapper)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # cancelled by someone else (client gone, shutdown): not ours to answer
            self._expired.discard(task)
            task.uncancel()
            if not sent:
                status = 504
                await _send_problem(send, 504, id_header, detail="The request took too long.")
            log.warning("http.timeout", path=scope["path"], timeout_s=self.timeout)
        except BodyTooLarge:
            if not sent:
                status = 413
                await _send_problem(
                    send, 413, id_header, detail=f"The request body exceeds {limit} bytes."
                )
        except Exception as error:
            # Raised outside a route (404, 405, an inner layer): its handler, as
            # ExceptionMiddleware would; anything without one is a bug.
            if handlers is None or not await handle_exception(
                handlers, error, scope, inner_receive, send_wrapper, started=sent != 0
            ):
                log.exception("http.unhandled", method=scope["method"], path=scope["path"])
                if not sent:
                    status = 500
                    await _send_problem(send, 500, id_header)
        finally:
            if sent:
                status = sent
            if counted:
                admission.in_flight -= 1  # type: ignore[union-attr]
            deadlines.pop(task, None)  # the sweeper removed it if it expired
            if files is not None and files.used:
                await files.aclose()
            elapsed = perf_counter() - started
            if UNTIMED not in scope:  # a stream's length is not a latency
                # The matched route object, its template read at flush (ADR 0056): FastAPI's
                # effective route context (an included router's route: every prefix), else
                # the route, else None (unmatched). ``route_template`` is the same, spelled out.
                fastapi_scope = scope.get("fastapi")
                route = fastapi_scope.get(_EFFECTIVE) if fastapi_scope else None
                recorder.finished(
                    scope["method"], scope.get("route") if route is None else route, status,
                    elapsed,
                )  # fmt: skip
            else:
                recorder.untimed()
            if elapsed >= self._log_above or status >= 500:
                log.info(
                    "http.request", method=scope["method"], path=scope["path"], status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )  # fmt: skip


#: Scope key a handler sets on a long-lived response (server-sent events): the request is not
#: recorded in the latency histogram, whose p95 would otherwise be the stream's length.
UNTIMED = "surge.untimed"


#: FastAPI's scope key (under ``scope["fastapi"]``) of an included route's effective context.
_EFFECTIVE = "effective_route_context"


def route_template(scope: Scope) -> str:
    """The matched route's path template with every router prefix, or ``<unmatched>``.

    FastAPI ≥ 0.160 keeps included routers nested, so ``scope["route"].path`` lacks the
    prefixes given at ``include_router`` time; the effective route context has the full one.
    """
    context = scope.get("fastapi", {}).get(_EFFECTIVE)
    return metrics.template(scope.get("route") if context is None else context)


async def _send_problem(
    send: Send, status: int, id_header: tuple[bytes, bytes], *, detail: str | None = None
) -> None:
    await send_problem(send, status, problem_body(status, detail=detail), (id_header,))
