"""The egress proxy pool: which proxy the next outbound request leaves through.

Each proxy carries its health: consecutive failures, the last error, an ``inactive`` flag and
when it may be tried again. A proxy the *target* blocks (a 403 or a block page, seed 000
``PROXY_BLOCKED``) is marked inactive at once; a proxy that fails to connect ``max_failures``
times in a row is marked inactive too. After ``cooldown`` an inactive proxy is eligible again,
one request at a time (a probe: real traffic, or ``OutboundClient.probe_proxies``): success
makes it active, another block restarts its cool-down. Among healthy proxies the one with the
fewest requests in flight is chosen, ties broken round-robin, so load spreads evenly and a slow
proxy gets less.

Credentials: a proxy is named by ``host:port`` (``Proxy.id``) everywhere — logs, metrics,
status — and ``scrub()`` removes its user/password from any error text before it is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from prometheus_client import Counter, Gauge

log = structlog.get_logger()

PROXY_REQUESTS = Counter(
    "egress_proxy_requests_total",
    "Outbound requests per egress proxy by outcome: success, blocked, failure.",
    ["proxy", "outcome"],
)
PROXY_ACTIVE = Gauge(
    "egress_proxy_active",
    "1 while the egress proxy is active (0: marked inactive, in cool-down).",
    ["proxy"],
    multiprocess_mode="livemin",
)


class NoProxyAvailable(LookupError):
    """Every proxy is inactive or already tried for this request (raised by ``acquire``)."""


@dataclass(eq=False)
class Proxy:
    """One egress proxy and its health. ``url`` holds the credentials: never log it."""

    url: str = field(repr=False)
    id: str = ""
    consecutive_failures: int = 0
    last_error: str | None = None
    inactive: bool = False
    retry_at: float = 0.0
    in_flight: int = 0
    probing: bool = False
    requests: int = 0
    blocks: int = 0
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if not self.id:
            self.id = f"{parts.hostname}:{parts.port or 80}"
        userinfo = parts.netloc.rpartition("@")[0]
        candidates = [userinfo, unquote(userinfo), parts.password, unquote(parts.password or "")]
        # A username alone is replaced only when long enough not to mangle ordinary words.
        if parts.username and len(parts.username) >= 4:
            candidates.append(parts.username)
        # Longest first, so "user:pass" goes before "pass" does.
        self.secrets = tuple(sorted({c for c in candidates if c}, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        """``text`` with this proxy's username and password replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "active": not self.inactive,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "blocks": self.blocks,
        }


class ProxyPool:
    """Healthy-proxy selection with failure accounting and cool-down (see module docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        cooldown: float = 300.0,
        max_failures: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("a proxy pool needs at least one proxy URL")
        self.proxies = [Proxy(url) for url in urls]
        self.cooldown = cooldown
        self.max_failures = max_failures
        self._clock = clock
        self._turn = 0
        for proxy in self.proxies:
            PROXY_ACTIVE.labels(proxy.id).set(1)

    def __len__(self) -> int:
        return len(self.proxies)

    def scrub(self, text: str) -> str:
        for proxy in self.proxies:
            text = proxy.scrub(text)
        return text

    def acquire(self, exclude: set[str] | frozenset[str] = frozenset()) -> Proxy:
        """The proxy for the next request. The caller reports how it went with exactly one of
        ``success``, ``blocked``, ``failure`` or ``release``."""
        now = self._clock()
        count = len(self.proxies)
        best: Proxy | None = None
        # An inactive proxy whose cool-down is over gets one request (a probe through real
        # traffic: if the target still blocks it, the caller fails over to another proxy).
        for proxy in self.proxies:
            due = proxy.inactive and not proxy.probing and now >= proxy.retry_at
            if due and proxy.id not in exclude:
                proxy.probing = True
                best = proxy
                break
        if best is None:
            for offset in range(count):
                proxy = self.proxies[(self._turn + offset) % count]
                if proxy.id in exclude or proxy.inactive:
                    continue
                if best is None or proxy.in_flight < best.in_flight:
                    best = proxy
        if best is None:
            raise NoProxyAvailable("no active egress proxy left to try")
        self._turn = (self.proxies.index(best) + 1) % count
        best.in_flight += 1
        best.requests += 1
        return best

    def success(self, proxy: Proxy) -> None:
        proxy.in_flight -= 1
        proxy.consecutive_failures = 0
        PROXY_REQUESTS.labels(proxy.id, "success").inc()
        if proxy.inactive:
            proxy.inactive = False
            proxy.probing = False
            PROXY_ACTIVE.labels(proxy.id).set(1)
            log.info("http.proxy.reactivated", proxy=proxy.id)

    def blocked(self, proxy: Proxy, *, status: int, reason: str) -> None:
        """The target refused this proxy's address: inactive now (seed 000 PROXY_BLOCKED)."""
        proxy.in_flight -= 1
        proxy.blocks += 1
        proxy.consecutive_failures += 1
        proxy.last_error = f"PROXY_BLOCKED: {reason}"
        PROXY_REQUESTS.labels(proxy.id, "blocked").inc()
        self._deactivate(proxy, status=status)

    def failure(self, proxy: Proxy, error: str) -> None:
        """The proxy itself failed (refused, timed out, bad tunnel)."""
        proxy.in_flight -= 1
        proxy.consecutive_failures += 1
        proxy.last_error = proxy.scrub(error)[:300]
        PROXY_REQUESTS.labels(proxy.id, "failure").inc()
        if proxy.probing or proxy.consecutive_failures >= self.max_failures:
            self._deactivate(proxy, status=None)
        else:
            log.warning(
                "http.proxy.failed",
                proxy=proxy.id,
                consecutive_failures=proxy.consecutive_failures,
                error=proxy.last_error,
            )

    def release(self, proxy: Proxy) -> None:
        """The request ended without telling anything about the proxy (e.g. cancelled)."""
        proxy.in_flight -= 1
        proxy.probing = False

    def _deactivate(self, proxy: Proxy, *, status: int | None) -> None:
        proxy.retry_at = self._clock() + self.cooldown
        proxy.probing = False
        first = not proxy.inactive
        proxy.inactive = True
        PROXY_ACTIVE.labels(proxy.id).set(0)
        log.warning(
            "http.proxy.blocked" if status is not None else "http.proxy.inactive",
            proxy=proxy.id,
            status=status,
            error=proxy.last_error,
            cooldown_s=self.cooldown,
            again=not first,
        )

    def status(self) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        for proxy in self.proxies:
            item = proxy.status()
            item["retry_in_s"] = round(max(0.0, proxy.retry_at - now), 3) if proxy.inactive else 0
            out.append(item)
        return out
