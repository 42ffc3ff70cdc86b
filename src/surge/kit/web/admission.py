"""``Admission``: the outermost ASGI layer — shed load at the door instead of collapsing.

Past a process's capacity, queues grow faster than they drain: every request waits longer,
clients time out and retry, and the server spends its CPU on answers nobody waits for any
more (metastable overload, ADR 0015 §9, ADR 0016). This layer refuses, before any other work
(no routing, no authentication, no database), what cannot be served in time:

1. **too old**: the request's ``X-Request-Start`` (set by the client or the proxy in front;
   ``t=`` optional, seconds / ms / µs since the epoch) says it already waited longer than
   ``patience`` — in the listen queue, the event loop's backlog, the proxy. Its client has
   most likely given up; serving it would only make the next ones late too;
2. **too many**: this process already has ``max_in_flight`` requests inside the app. Each
   one more adds to everyone's latency (they share one event loop) and to the database
   pool's queue.

A refused request gets ``503`` ``application/problem+json`` with ``Retry-After`` (pre-rendered
bytes: refusing must cost far less than serving) and is counted in
``http_requests_shed_total{reason}``. Paths in ``exempt`` (health, readiness, metrics) always
pass: an orchestrator must see a busy process as alive and ready, and an operator must see
its metrics.

Nothing here reads the body or touches a domain: it could wrap any ASGI app.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import NamedTuple

from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from surge.kit.web.problem import PROBLEM_JSON, problem_body

SHED = Counter(
    "http_requests_shed_total",
    "Requests refused at the door with 503 (reason: too_old = waited longer than the "
    "patience before reaching the app; busy = the process had its maximum in flight).",
    ["reason"],
)
_SHED_OLD = SHED.labels("too_old")
_SHED_BUSY = SHED.labels("busy")


class Refusal(NamedTuple):
    """A pre-rendered 503: its headers and its body."""

    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


#: ``Admission.enter``'s answers besides a ``Refusal``.
ADMITTED = True
EXEMPT = False
Verdict = Refusal | bool

#: Paths that are never shed (exact match): probes and the metrics scrape.
DEFAULT_EXEMPT = ("/livez", "/readyz", "/healthz", "/api/health", "/metrics")


def request_age(headers: Iterable[tuple[bytes, bytes]], now: float) -> float | None:
    """Seconds since ``X-Request-Start`` (``t=`` optional; s, ms or µs since the epoch), or
    None when absent or unparseable. Negative (a clock ahead of ours) reads as 0."""
    for name, value in headers:
        if name == b"x-request-start":
            stamp = request_start(value)
            return None if stamp is None else max(0.0, now - stamp)
    return None


def request_start(value: bytes) -> float | None:
    """An ``X-Request-Start`` value as seconds since the epoch, or None if unparseable."""
    raw = value[2:] if value[:2] == b"t=" else value
    try:
        stamp = float(raw)
    except ValueError:
        return None
    while stamp > 1e11:  # µs or ms since the epoch → seconds
        stamp /= 1000
    return stamp


class Admission:
    """Bound the requests in flight in this process; refuse the old and the excess (503)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_in_flight: int,
        patience: float,
        retry_after: int = 1,
        exempt: Iterable[str] = DEFAULT_EXEMPT,
    ) -> None:
        """``max_in_flight`` ≤ 0 and ``patience`` ≤ 0 each turn their check off."""
        self.app = app
        self.max_in_flight = max_in_flight
        self.patience = patience
        self.exempt = frozenset(exempt)
        self.in_flight = 0
        self._busy = _refusal(retry_after, "busy", "The server is at capacity; retry shortly.")
        self._old = _refusal(retry_after, "too_old", "The request waited too long before it could be served; retry shortly.")  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stamp = None
        for name, value in scope["headers"]:
            if name == b"x-request-start":
                stamp = request_start(value)
                break
        verdict = self.enter(scope["path"], stamp)
        if isinstance(verdict, Refusal):
            await refuse(send, verdict)
            return
        if verdict is EXEMPT:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def enter(self, path: str, started: float | None) -> Verdict:
        """The door for a request to ``path`` whose ``X-Request-Start`` (``request_start``)
        is ``started``, without a layer of its own: ``SurgeMiddleware(admission=...)`` calls
        it from the one layer every request passes, with the stamp from its own pass over
        the headers (ADR 0029). ``EXEMPT`` (not counted), ``ADMITTED`` (counted: the caller
        decrements ``in_flight`` when the request is done) or the refusal to send (already
        counted in ``http_requests_shed_total``)."""
        if path in self.exempt:
            return EXEMPT
        if started is not None and self.patience > 0 and time.time() - started > self.patience:
            _SHED_OLD.inc()
            return self._old
        if 0 < self.max_in_flight <= self.in_flight:
            _SHED_BUSY.inc()
            return self._busy
        self.in_flight += 1
        return ADMITTED


async def refuse(send: Send, refusal: Refusal) -> None:
    """Send a pre-rendered 503 refusal."""
    await send({"type": "http.response.start", "status": 503, "headers": list(refusal.headers)})
    await send({"type": "http.response.body", "body": refusal.body})


def _refusal(retry_after: int, reason: str, detail: str) -> Refusal:
    body = problem_body(503, detail=detail, type_=f"overloaded/{reason}")
    headers = (
        (b"content-type", PROBLEM_JSON.encode()),
        (b"retry-after", str(max(0, retry_after)).encode()),
        (b"content-length", str(len(body)).encode()),
    )
    return Refusal(headers, body)
