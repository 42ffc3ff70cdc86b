"""FastAPI/ASGI side of the limiter: a global middleware, a per-route dependency, headers.

``RateLimitMiddleware`` sits inside ``SurgeMiddleware`` (so a 429 carries a request id and is
counted). For each request it asks the ``identify`` hook who is calling, resolves the client
IP (``X-Forwarded-For`` only from trusted proxies), collects every policy that applies — the
global ones matched by tier, path and method, plus the ``RouteLimit`` policies of the route
the request will reach — and decides them all in **one** Redis round trip. The route lookup
uses the app's own routes (only those that declare a ``RouteLimit``, so unlimited routes cost
nothing), which is what lets an endpoint limit ride in the same round trip as the tier limit.

``RouteLimit`` is also a FastAPI dependency: under the middleware it only returns the
decision already made; without the middleware (``surge.kit`` used in another service) it
checks its own policies and raises ``TooManyRequests``.

Responses of limited routes carry the IETF draft (draft-ietf-httpapi-ratelimit-headers-10)
fields ``RateLimit-Policy: "name";q=LIMIT;w=SECONDS`` and
``RateLimit: "name";r=REMAINING;t=SECONDS``, one item per enforced policy.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import re
from collections.abc import Awaitable, Sequence
from typing import Any

import structlog
from fastapi import Request, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from surge.kit.errors import ServiceUnavailable, TooManyRequests
from surge.kit.ratelimit.limiter import Check, Decision, RateLimiter
from surge.kit.ratelimit.policy import ANONYMOUS, Per, RatePolicy, Subject
from surge.kit.ratelimit.policy import Scope as PolicyScope
from surge.kit.web.client_ip import UNKNOWN, ClientIpResolver, ip_bucket
from surge.kit.web.middleware import RESPONSE_HEADERS
from surge.kit.web.problem import problem_body, send_problem

log = structlog.get_logger()

STATE_DECISION = "ratelimit"
STATE_COVERED = "ratelimit_covered"
STATE_LIMITER = "ratelimiter"
#: Distinct (caller, route) plans a middleware remembers before starting over. Above the
#: active population times its routes (seed 003: 10 000 users × 2-3 routes, each seen by
#: every web process): at 10 000 it was cleared every few seconds under ``surge load``.
MEMO_MAX = 65_536
_Plan = tuple[list[Check], frozenset[int]]


class RouteLimit:
    """``Depends(RouteLimit("expensive-20-per-minute", cost=5))``: endpoint limits.

    ``policies`` are names of configured ``scope="route"`` policies or ``RatePolicy``
    objects; their budget is kept per route and per caller. ``cost`` is what one call spends
    of them; ``weight``, if set, is what it spends of the global (tier, IP) policies instead
    of their own cost (an export that counts as 10 requests of the caller's quota).
    """

    def __init__(self, *policies: str | RatePolicy, cost: int = 1, weight: int | None = None):
        if not policies:
            raise ValueError("RouteLimit needs at least one policy")
        if cost < 0 or (weight is not None and weight < 0):
            raise ValueError("RouteLimit cost and weight cannot be negative (they would refund)")
        self.names = policies
        self.cost = cost
        self.weight = weight
        self._resolved: tuple[int, list[RatePolicy]] | None = None

    def resolve(self, limiter: RateLimiter) -> list[RatePolicy]:
        """The policies, names looked up in ``limiter`` (``RateLimitError`` if unknown)."""
        if self._resolved is None or self._resolved[0] != id(limiter):
            policies = [p if isinstance(p, RatePolicy) else limiter.policy(p) for p in self.names]
            self._resolved = (id(limiter), policies)
        return self._resolved[1]

    async def __call__(self, request: Request, response: Response) -> Decision:
        state = request.scope.setdefault("state", {})
        if id(self) in state.get(STATE_COVERED, ()):
            decision: Decision = state[STATE_DECISION]
            return decision
        limiter = find_limiter(request)
        route = request.scope.get("route")
        template = getattr(route, "path", request.url.path)
        subject = await _identify(limiter, request.scope)
        ip = ip_bucket(limiter.client_ip(request.scope))
        checks = [
            Check(
                policy, _partition(policy, subject, ip, f"{request.method} {template}"), self.cost
            )
            for policy in self.resolve(limiter)
        ]
        decision = await limiter.check([c for c in checks if c.partition])
        state[STATE_DECISION] = decision
        raise_for(decision)
        for name, value in rate_limit_headers(decision):
            response.headers[name.decode()] = value.decode()
        return decision


def find_limiter(request: Request) -> RateLimiter:
    """The limiter the middleware registered, else ``app.state.runtime.extensions``."""
    limiter = request.scope.get("state", {}).get(STATE_LIMITER)
    if limiter is None:
        runtime = getattr(request.app.state, "runtime", None)
        limiter = getattr(runtime, "extensions", {}).get("ratelimit")
    if not isinstance(limiter, RateLimiter):
        raise RuntimeError("no RateLimiter: install RateLimitMiddleware or runtime.extensions")
    return limiter


def raise_for(decision: Decision) -> None:
    """Turn a denied decision into the error the problem handlers render."""
    if decision.allowed:
        return
    if decision.unavailable:
        raise ServiceUnavailable("The rate limiter is unavailable; retry shortly.", retry_after=1)
    raise TooManyRequests(
        _detail(decision),
        retry_after=decision.retry_after,
        headers={k.decode(): v.decode() for k, v in rate_limit_headers(decision)},
        extra={"policies": decision.denied_by},
    )


class RateLimitMiddleware:
    """Applies every matching policy of a request in one decision; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter,
        exempt_paths: Sequence[str] = ("/livez", "/readyz", "/metrics", "/api/health"),
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.exempt_exact = frozenset(p for p in exempt_paths if not _is_glob(p))
        globs = [p for p in exempt_paths if _is_glob(p)]
        self.exempt_glob = re.compile("|".join(_glob(p) for p in globs)) if globs else None
        self.global_policies = [
            p for p in limiter.policies.values() if p.scope is PolicyScope.global_
        ]
        self._routes: list[tuple[BaseRoute, list[RouteLimit]]] | None = None
        #: (caller, tier, ip, method, root path, path) → the checks that apply and the route
        #: limits they cover: matching policies and routes is pure, so a caller repeating a
        #: request pays it once. Bounded; cleared whole when full (paths with ids churn it).
        self._memo: dict[tuple[str | None, str, str, str, str, str], _Plan] = {}

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function, not a coroutine: an exempt request (probes, /metrics) goes
        # straight to the inner app's coroutine, without a frame of this layer (ADR 0023).
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        path = scope["path"]
        if path in self.exempt_exact or (
            self.exempt_glob is not None and self.exempt_glob.match(path) is not None
        ):
            return self.app(scope, receive, send)
        return self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        limiter = self.limiter
        state[STATE_LIMITER] = limiter
        subject = _identify_now(limiter, scope)
        if subject is not None and type(subject) is not Subject:
            subject = await _identify_later(subject, scope)
        checks = self._checks(scope, state, subject)
        if not checks:
            await self.app(scope, receive, send)
            return
        decision = await limiter.check(checks)
        state[STATE_DECISION] = decision
        headers = rate_limit_headers(decision)
        if not decision.allowed:
            await _send_denied(send, decision, headers, scope["path"])
            return
        if not headers:
            await self.app(scope, receive, send)
            return
        extra: list[tuple[bytes, bytes]] | None = scope.get(RESPONSE_HEADERS)
        if extra is not None:  # SurgeMiddleware adds them to the response it wraps anyway
            extra.extend(headers)
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _checks(self, scope: Scope, state: dict[str, Any], subject: Subject | None) -> list[Check]:
        tier = subject.tier if subject is not None else ANONYMOUS
        ip = self.limiter.client_ip(scope)
        method: str = scope["method"]
        path: str = scope["path"]
        key = (
            subject.id if subject is not None else None,
            tier, ip, method, scope.get("root_path", ""), path,
        )  # fmt: skip
        plan = self._memo.get(key)
        if plan is None:
            if len(self._memo) >= MEMO_MAX:
                self._memo.clear()
            plan = self._memo[key] = self._plan(scope, subject, tier, ip_bucket(ip))
        checks, covered = plan
        if covered:
            state.setdefault(STATE_COVERED, set()).update(covered)
        return checks

    def _plan(self, scope: Scope, subject: Subject | None, tier: str, ip: str) -> _Plan:
        """The checks for one (caller, route) and the ids of the route limits they cover."""
        method: str = scope["method"]
        path: str = scope["path"]
        route_limits: list[RouteLimit] = []
        template = path
        for route, limits in self._limited_routes(scope):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                route_limits, template = limits, getattr(route, "path", path)
                break
        weight = next((rl.weight for rl in route_limits if rl.weight is not None), None)
        checks: list[Check] = []
        for policy in self.global_policies:
            if policy.matches(method, path, tier, subject is not None):
                partition = _partition(policy, subject, ip, None)
                if partition:
                    checks.append(
                        Check(policy, partition, policy.cost if weight is None else weight)
                    )
        covered: frozenset[int] = frozenset()
        if route_limits:
            endpoint = f"{method} {template}"
            covered = frozenset(id(route_limit) for route_limit in route_limits)
            for route_limit in route_limits:
                for policy in route_limit.resolve(self.limiter):
                    partition = _partition(policy, subject, ip, endpoint)
                    if partition:
                        checks.append(Check(policy, partition, route_limit.cost))
        return checks, covered

    def _limited_routes(self, scope: Scope) -> list[tuple[BaseRoute, list[RouteLimit]]]:
        if self._routes is None:
            app = scope.get("app")
            routes: list[BaseRoute] = list(getattr(getattr(app, "router", None), "routes", []))
            found = [(route, _route_limits(route)) for route in routes]
            self._routes = [(route, limits) for route, limits in found if limits]
        return self._routes


def _route_limits(route: BaseRoute) -> list[RouteLimit]:
    """Every ``RouteLimit`` among a route's dependencies (nested ones included)."""
    found: list[RouteLimit] = []
    pending = [getattr(route, "dependant", None)]
    while pending:
        dependant = pending.pop()
        if dependant is None:
            continue
        if isinstance(dependant.call, RouteLimit):
            found.append(dependant.call)
        pending += dependant.dependencies
    return found


async def _identify(limiter: RateLimiter, scope: Scope) -> Subject | None:
    """The caller, or None. A failing hook must not turn every request into a 500: the
    caller is then treated as anonymous (limited per IP) and the failure is logged."""
    result = _identify_now(limiter, scope)
    if result is None or isinstance(result, Subject):
        return result
    return await _identify_later(result, scope)


def _identify_now(limiter: RateLimiter, scope: Scope) -> Subject | Awaitable[Subject | None] | None:
    """The hook's answer: a ``Subject``, None, or an awaitable when it needs I/O (the
    common case, a caller whose token and plan are in memory, costs no coroutine)."""
    try:
        return limiter.identify(scope)
    except Exception:
        log.exception("ratelimit.identify_failed", path=scope.get("path"))
        return None


async def _identify_later(pending: Any, scope: Scope) -> Subject | None:
    try:
        if inspect.isawaitable(pending):
            pending = await pending
    except Exception:
        log.exception("ratelimit.identify_failed", path=scope.get("path"))
        return None
    return pending  # type: ignore[no-any-return]


def _partition(policy: RatePolicy, subject: Subject | None, ip: str, endpoint: str | None) -> str:
    if policy.per is Per.ip or (policy.per is Per.subject_or_ip and subject is None):
        who = f"ip:{ip}"
    elif subject is not None:
        who = f"id:{subject.id}"
    else:
        return ""  # a per-subject policy does not apply to an anonymous caller
    return f"{endpoint}|{who}" if endpoint else who


_METERED = ("redis", "local", "lease")


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` and ``RateLimit`` for the enforced, metered policies."""
    if decision.rels is not None:
        return _script_headers(decision, decision.rels)
    shown = [v for v in decision.verdicts if not v.policy.shadow and v.store in _METERED]
    if not shown:
        return []
    policy = ", ".join(v.policy.header_item() for v in shown)
    state = ", ".join(
        f'"{v.policy.name}";r={v.remaining};t={math.ceil(v.reset_after)}' for v in shown
    )
    return [(b"ratelimit-policy", policy.encode()), (b"ratelimit", state.encode())]


#: id(checks) → (checks, its RateLimit-Policy value, per enforced check what its ``RateLimit``
#: item needs): the middleware's plans are memoised, so a caller's checks are the same list
#: request after request (kept alive here, so an id cannot be reused while cached). Bounded;
#: cleared whole when full.
_POLICY_FIELDS: dict[
    int, tuple[Sequence[Check], bytes, list[tuple[int, bytes, int, int, int, int]]]
] = {}


def _script_headers(decision: Decision, rels: list[int]) -> list[tuple[bytes, bytes]]:
    """The same fields as from the verdicts, computed from what the script returned
    (``remaining`` and ``t`` as ``_verdict`` computes them) without building verdicts."""
    checks = decision.checks
    cached = _POLICY_FIELDS.get(id(checks))
    if cached is None or cached[0] is not checks:
        if len(_POLICY_FIELDS) >= MEMO_MAX:
            _POLICY_FIELDS.clear()
        items = [c.policy.header_item() for c in checks if not c.policy.shadow]
        shown = [
            (i, b"%s;r=" % c.policy.header_name, c.step, c.ceiling, c.policy.period_us,
             c.policy.interval_us)
            for i, c in enumerate(checks) if not c.policy.shadow
        ]  # fmt: skip
        cached = _POLICY_FIELDS[id(checks)] = (checks, ", ".join(items).encode(), shown)
    if not cached[1]:
        return []
    allowed = decision.allowed
    state = []
    for index, name, step, ceiling, period, interval in cached[2]:
        rel = rels[index]
        after = rel + step if allowed and rel <= ceiling else rel
        remaining = (period - after) // interval
        state.append(
            b"%s%d;t=%d" % (name, remaining if remaining > 0 else 0, -(-after // 1_000_000))
        )
    return [(b"ratelimit-policy", cached[1]), (b"ratelimit", b", ".join(state))]


def _detail(decision: Decision) -> str:
    return (
        f"Rate limit exceeded ({', '.join(decision.denied_by)}); "
        f"retry in {max(1, math.ceil(decision.retry_after))} s."
    )


async def _send_denied(
    send: Send, decision: Decision, headers: list[tuple[bytes, bytes]], path: str
) -> None:
    if decision.unavailable:
        status, slug, retry = 503, "rate-limit-unavailable", 1
        detail = "The rate limiter is unavailable; retry shortly."
        extra: dict[str, Any] = {}
    else:
        status, slug = 429, "too-many-requests"
        retry = max(1, math.ceil(decision.retry_after))
        detail = _detail(decision)
        extra = {"policies": decision.denied_by, "retry_after": retry}
    body = problem_body(status, type_=slug, detail=detail, instance=path, extra=extra)
    await send_problem(send, status, body, [(b"retry-after", str(retry).encode()), *headers])


class MemoClientIp(ClientIpResolver):
    """``ClientIpResolver`` that remembers its last answers per (peer, ``X-Forwarded-For``).

    With trusted proxies configured, resolving parses every hop with ``ipaddress`` (several
    µs a request: in a profile of one web worker under load it cost as much as the limiter's
    own decision once round trips were shared); a fleet sees the same few peers over and over.
    At most ``size`` entries: the header is the caller's to choose, so the memo is dropped
    when full rather than allowed to grow.
    """

    def __init__(self, trusted_proxies: Sequence[str], *, size: int = 4096) -> None:
        super().__init__(trusted_proxies)
        self.size = size
        self._memo: dict[tuple[str, bytes | None], str] = {}

    def __call__(self, scope: Any) -> str:
        if not self.networks:
            client = scope.get("client")
            return str(client[0]) if client else UNKNOWN
        client = scope.get("client")
        forwarded: bytes | None = None
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                forwarded = value if forwarded is None else forwarded + b"," + value
        key = (str(client[0]) if client else UNKNOWN, forwarded)
        found = self._memo.get(key)
        if found is None:
            found = super().__call__(scope)
            if len(self._memo) >= self.size:
                self._memo.clear()
            self._memo[key] = found
        return found


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _glob(pattern: str) -> str:
    return fnmatch.translate(pattern)
