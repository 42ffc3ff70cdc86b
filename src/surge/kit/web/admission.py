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

#: Paths that are never shed (exact match): probes and the metrics scrape.
DEFAULT_EXEMPT = ("/livez", "/readyz", "/healthz", "/api/health", "/metrics")


def request_age(headers: Iterable[tuple[bytes, bytes]], now: float) -> float | None:
    """Seconds since ``X-Request-Start`` (``t=`` optional; s, ms or µs since the epoch), or
    None when absent or unparseable. Negative (a clock ahead of ours) reads as 0."""
    for name, value in headers:
        if name == b"x-request-start":
            raw = value[2:] if value[:2] == b"t=" else value
            try:
                stamp = float(raw)
            except ValueError:
                return None
            while stamp > 1e11:  # µs or ms since the epoch → seconds
                stamp /= 1000
            return max(0.0, now - stamp)
    return None


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
        self._start_busy = _start(retry_after)
        self._start_old = _start(retry_after)
        self._body_busy = _body("busy", "The server is at capacity; retry shortly.")
        self._body_old = _body("too_old", "The request waited too long before it could be served; retry shortly.")  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.patience > 0:
            age = request_age(scope["headers"], time.time())
            if age is not None and age > self.patience:
                _SHED_OLD.inc()
                await self._refuse(send, self._start_old, self._body_old)
                return
        if 0 < self.max_in_flight <= self.in_flight:
            _SHED_BUSY.inc()
            await self._refuse(send, self._start_busy, self._body_busy)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _refuse(send: Send, start: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers = [*start, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _start(retry_after: int) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"retry-after", str(max(0, retry_after)).encode()),
    ]


def _body(reason: str, detail: str) -> bytes:
    return problem_body(503, detail=detail, type_=f"overloaded/{reason}")
