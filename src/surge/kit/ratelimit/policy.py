"""Rate-limit policies: what is limited, per whom, on which routes, and how it fails.

A policy is data (pydantic), so the whole set is declared in configuration
(``SURGE_RATELIMIT_POLICIES`` as JSON) and validated when the limiter is built::

    {"name": "tier-free-15m", "limit": 300, "period": "PT15M", "per": "subject",
     "tiers": ["free"]}

``per`` says what one budget belongs to: ``subject`` (an identified caller; skipped for
anonymous ones), ``ip`` (the client IP, see ``surge.kit.web.client_ip``) or
``subject_or_ip``. ``tiers`` restricts a policy to callers of those tiers (the anonymous
caller's tier is ``"anonymous"``). ``scope="global"`` policies are applied by the middleware
to every matching request; ``scope="route"`` policies only where a route names them with
``RouteLimit`` and their budget is kept per route.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ANONYMOUS = "anonymous"
"""The tier of a caller the ``identify`` hook did not recognise."""


class Per(StrEnum):
    """Whose budget a request spends."""

    subject = "subject"
    ip = "ip"
    subject_or_ip = "subject_or_ip"


class Failure(StrEnum):
    """What a policy does while Redis is unreachable."""

    local = "local"
    """Each process enforces its share of the limit in memory (limit / processes)."""
    open = "open"
    """Allow everything: the limit protects nothing critical."""
    closed = "closed"
    """Refuse with 503: better no answer than an unmetered one (e.g. a costly upstream)."""


class Scope(StrEnum):
    global_ = "global"
    route = "route"


class RatePolicy(BaseModel):
    """One limit: ``limit`` units per ``period`` for each partition (subject, IP, route)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Stable identifier: in Redis keys, metrics labels and the RateLimit-Policy header."""
    limit: int = Field(gt=0)
    """Units (requests, or weighted cost) allowed per ``period``."""
    period: timedelta
    """The window: after a burst of ``limit``, capacity returns at ``limit / period``."""
    per: Per = Per.subject_or_ip
    tiers: tuple[str, ...] = ()
    """Apply only to callers of these tiers; empty = every caller."""
    routes: tuple[str, ...] = ()
    """Path patterns (``fnmatch``: ``/api/v1/exports*``) this policy applies to; empty = all."""
    except_routes: tuple[str, ...] = ()
    """Path patterns this policy does not apply to (a constant file a page loads should not
    spend the budget meant for what the page does; another policy can budget it instead)."""
    methods: tuple[str, ...] = ()
    """HTTP methods this policy applies to; empty = all."""
    scope: Scope = Scope.global_
    cost: int = Field(default=1, ge=0)
    """Units one matching request spends (weighted endpoints spend more)."""
    failure: Failure = Failure.local
    shadow: bool = False
    """Count and log, never block: for rolling out a new policy and watching what it would do."""
    lease: int | None = Field(default=None, ge=0)
    """Units a process may take from Redis at once and spend in memory (ADR 0028), when the
    limiter leases: None sizes it from the limit, 0 keeps this policy exact (every decision
    in Redis). The bound: at most processes × lease units past the limit in a window."""

    @field_validator("period")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value < timedelta(milliseconds=1):
            raise ValueError("period must be at least 1 ms")
        return value

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(method.upper() for method in value)

    @model_validator(mode="after")
    def _countable(self) -> RatePolicy:
        """GCRA counts in whole microseconds: ``limit`` units must fit ``period`` exactly
        with an interval of ``period // limit`` µs. A very fine policy (10**9 a minute) would
        otherwise allow ``period // interval`` units, not ``limit``: refuse it here."""
        period_us = int(self.period / timedelta(microseconds=1))
        interval = period_us // self.limit
        if interval < 1 or period_us // interval != self.limit:
            raise ValueError(
                f"{self.limit} per {self.period} cannot be counted exactly in whole "
                "microseconds; declare it over a longer period (the same rate, e.g. per hour)"
            )
        return self

    @cached_property
    def period_us(self) -> int:
        return int(self.period / timedelta(microseconds=1))

    @cached_property
    def interval_us(self) -> int:
        """Emission interval of the GCRA, truncated to whole µs so that exactly ``limit``
        units fit in ``period`` (``limit × interval ≤ period < (limit + 1) × interval``)."""
        return max(1, self.period_us // self.limit)

    @cached_property
    def _route_regex(self) -> re.Pattern[str] | None:
        if not self.routes:
            return None
        return re.compile("|".join(fnmatch.translate(pattern) for pattern in self.routes))

    @cached_property
    def _except_regex(self) -> re.Pattern[str] | None:
        if not self.except_routes:
            return None
        return re.compile("|".join(fnmatch.translate(p) for p in self.except_routes))

    def matches(self, method: str, path: str, tier: str, identified: bool) -> bool:
        """Does this policy apply to a request (tier, route, method, who is calling)?"""
        if self.tiers and tier not in self.tiers:
            return False
        if self.per is Per.subject and not identified:
            return False
        if self.methods and method not in self.methods:
            return False
        regex = self._route_regex
        if regex is not None and regex.match(path) is None:
            return False
        excluded = self._except_regex
        return excluded is None or excluded.match(path) is None

    def header_item(self) -> str:
        """This policy as an item of the IETF ``RateLimit-Policy`` field."""
        return self._header_item

    @cached_property
    def _header_item(self) -> str:  # every limited response carries it: format it once
        return f'"{self.name}";q={self.limit};w={max(1, round(self.period.total_seconds()))}'

    @cached_property
    def header_name(self) -> bytes:
        """The policy's name as a quoted string of the IETF fields (``b'"name"'``)."""
        return f'"{self.name}"'.encode()


#: The built-in budget of the constant routes (``with_constant_routes``): 300 a minute per IP.
CONSTANT_POLICY: dict[str, Any] = {"name": "static-1m", "limit": 300, "period": "PT1M", "per": "ip"}


def with_constant_routes(
    raw: Sequence[dict[str, Any] | RatePolicy], routes: Sequence[str]
) -> list[dict[str, Any] | RatePolicy]:
    """The configured policies with the constant routes' budget merged in (ADR 0054, 0060):
    files and pages that hold no data and do no per-caller work (``routes``: fnmatch
    patterns) spend ``static-1m`` per IP instead of the tier budgets meant for what a caller
    does, whether the policies are the defaults or an operator's own list.

    - ``static-1m`` (``CONSTANT_POLICY``) is added unless a policy of that name is configured;
      a configured one without ``routes`` gets ``routes``.
    - Every global policy restricted to ``tiers`` that says nothing of ``except_routes``
      gets ``routes`` there. One that sets ``except_routes`` (even to ``[]``) is left as is;
      policies for every tier (flood caps such as ``ip-1m``) keep counting those routes.

    No ``routes`` (``RATELIMIT_STATIC_ROUTES`` empty): the policies as configured."""
    if not routes:
        return list(raw)
    merged: list[dict[str, Any] | RatePolicy] = []
    named = False
    for policy in raw:
        data = policy.model_dump() if isinstance(policy, RatePolicy) else dict(policy)
        given = policy.model_fields_set if isinstance(policy, RatePolicy) else set(policy)
        if data.get("name") == CONSTANT_POLICY["name"]:
            named = True
            if not data.get("routes"):
                merged.append({**data, "routes": list(routes)})
                continue
        elif (
            data.get("tiers")
            and not data.get("routes")
            and str(data.get("scope", Scope.global_)) == Scope.global_
            and "except_routes" not in given
        ):
            merged.append({**data, "except_routes": list(routes)})
            continue
        merged.append(policy)
    if not named:
        merged.append({**CONSTANT_POLICY, "routes": list(routes)})
    return merged


def parse_policies(raw: Sequence[dict[str, Any] | RatePolicy]) -> list[RatePolicy]:
    """Validate the configured policies; names must be unique."""
    policies = [p if isinstance(p, RatePolicy) else RatePolicy.model_validate(p) for p in raw]
    seen: set[str] = set()
    for policy in policies:
        if policy.name in seen:
            raise ValueError(f"two rate-limit policies are named {policy.name!r}")
        seen.add(policy.name)
    return policies


@dataclass(frozen=True, slots=True)
class Subject:
    """Who is calling, as the ``identify`` hook tells the limiter: an id and a tier."""

    id: str
    tier: str


Identify = Callable[[Any], "Subject | Awaitable[Subject | None] | None"]
"""Who is calling: takes the ASGI scope, returns a ``Subject`` (or None: anonymous), sync or
async. Set ``limiter.identify`` to plug an authentication scheme in."""


def subject_from_state(scope: Any) -> Subject | None:
    """Default ``identify``: whatever an earlier layer put in ``scope["state"]["subject"]``
    (anything with ``id`` and ``tier`` attributes); anonymous otherwise."""
    found = scope.get("state", {}).get("subject")
    if found is None:
        return None
    if isinstance(found, Subject):
        return found
    identifier, tier = getattr(found, "id", None), getattr(found, "tier", None)
    if identifier is None:
        return None
    return Subject(str(identifier), str(tier) if tier is not None else ANONYMOUS)
