"""One outbound HTTP client: timeouts, retries with backoff and jitter, a breaker per target,
and failover across an egress proxy pool.

    UpstreamError (surge.kit.breaker; < DependencyUnavailable < ServiceUnavailable)
    ├── BreakerOpenError        the target's breaker is open: not attempted
    └── OutboundError           the call failed after its retries
        ├── OutboundTimeout     ... the last attempt timed out
        └── ProxyUnavailable    no egress proxy left to try
            └── ProxyBlocked    ... and the last one was blocked (seed 000 ``PROXY_BLOCKED``)

Order of the layers, outermost first: retry loop → proxy choice → breaker (per target
``host:port``) → httpx with connect/read timeouts. So a retry of a failed call is itself seen
by the breaker, and an open breaker stops the retries at once.

What is retried:
- a block (403, or a block page whose text matches ``block_markers``) when going through a
  proxy: the target refused the *address*, not the request, so any method is retried at once
  on another proxy and the blocking proxy is marked inactive; the target's breaker does not
  count it (the target is fine);
- a proxy that could not be reached (connect error/timeout on the proxy): nothing was sent,
  so any method is retried on another proxy;
- a timeout, a dropped connection or a 502/503/504 from the target: only for idempotent calls
  (GET, HEAD, OPTIONS, PUT, DELETE, or ``idempotent=True`` when the caller sends an
  idempotency key), with exponential backoff and full jitter (``random(0, min(cap,
  base × 2^attempt))``, AWS architecture blog "Exponential Backoff and Jitter"); a
  ``Retry-After`` up to the cap is honoured.
A final 5xx answer is returned (the caller decides); a final transport error raises.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import structlog
from prometheus_client import Counter, Histogram

from surge.kit.backoff import delay as backoff_delay
from surge.kit.breaker import BreakerConfig, BreakerOpenError, BreakerRegistry, UpstreamError
from surge.kit.breaker import breakers as default_breakers
from surge.kit.http.proxies import NoProxyAvailable, Proxy, ProxyPool

if TYPE_CHECKING:
    from surge.config import Settings

log = structlog.get_logger()

OUTBOUND_REQUESTS = Counter(
    "http_outbound_requests_total",
    "Outbound HTTP attempts by target and outcome: ok, client_error, server_error, "
    "transport_error, timeout, blocked, proxy_error, breaker_open.",
    ["target", "outcome"],
)
OUTBOUND_DURATION = Histogram(
    "http_outbound_duration_seconds",
    "Outbound HTTP attempt duration by target.",
    ["target"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRY_STATUSES = frozenset({502, 503, 504})
DEFAULT_BLOCK_MARKERS = ("access denied", "your ip has been blocked", "request blocked")


class OutboundError(UpstreamError):
    """An outbound call failed after its retries."""

    def __init__(self, message: str, *, target: str, **kwargs: Any) -> None:
        kwargs.setdefault("retry_after", 5)
        super().__init__(message, extra={"target": target}, **kwargs)
        self.target = target


class OutboundTimeout(OutboundError):
    """The last attempt timed out (connect or read)."""


class ProxyUnavailable(OutboundError):
    """No egress proxy left to try for this request."""


class ProxyBlocked(ProxyUnavailable):
    """``PROXY_BLOCKED``: the target blocked every proxy tried (the last one included)."""


class _ServerError(Exception):
    """A 5xx answer, raised inside the breaker so that it counts, then unwrapped."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class _ProxyFailed(Exception):
    """The egress proxy could not be reached or refused the tunnel (not the target's fault)."""

    def __init__(self, error: httpx.HTTPError) -> None:
        super().__init__(str(error))
        self.error = error


class OutboundClient:
    """Surge's outbound HTTP client. One per process and purpose; reuse it (it pools
    connections per proxy). ``await client.close()`` at shutdown (the runtime does it for
    clients stored in ``runtime.extensions``)."""

    def __init__(
        self,
        *,
        proxies: ProxyPool | Sequence[str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.2,
        backoff_max: float = 5.0,
        breakers: BreakerRegistry | None = None,
        breaker_config: BreakerConfig | None = None,
        block_statuses: Sequence[int] = (403,),
        block_markers: Sequence[str] = DEFAULT_BLOCK_MARKERS,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 100,
    ) -> None:
        if proxies is not None and not isinstance(proxies, ProxyPool):
            proxies = ProxyPool(list(proxies))
        self.pool: ProxyPool | None = proxies
        self.timeout = httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        )
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.breakers = breakers if breakers is not None else default_breakers
        # Thresholds from ``breaker_config``; what counts is ours: 5xx answers and transport
        # errors to the target. 4xx answers, blocks and proxy failures never count.
        self.breaker_config = replace(
            breaker_config or BreakerConfig(), record=(_ServerError, httpx.TransportError)
        )
        self.block_statuses = frozenset(block_statuses)
        self.block_markers = tuple(marker.lower() for marker in block_markers)
        self._headers = dict(headers or {})
        self._limits = httpx.Limits(max_connections=max_connections)
        self._clients: dict[str | None, httpx.AsyncClient] = {}

    def _client(self, proxy: Proxy | None) -> httpx.AsyncClient:
        key = proxy.id if proxy is not None else None
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                proxy=proxy.url if proxy is not None else None,
                timeout=self.timeout,
                limits=self._limits,
                headers=self._headers,
                follow_redirects=False,
                # Never pick up HTTP(S)_PROXY from the environment: egress is explicit.
                trust_env=False,
            )
            self._clients[key] = client
        return client

    def _scrub(self, text: str) -> str:
        return self.pool.scrub(text) if self.pool is not None else text

    def _block_reason(self, response: httpx.Response) -> str | None:
        if response.status_code in self.block_statuses:
            return f"HTTP {response.status_code}"
        content_type = response.headers.get("content-type", "")
        if self.block_markers and "html" in content_type and len(response.content) < 65536:
            text = response.text.lower()
            for marker in self.block_markers:
                if marker in text:
                    return f"block page ({marker!r})"
        return None

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None and (retry_after := response.headers.get("retry-after")):
            try:
                return min(float(retry_after), self.backoff_max)
            except ValueError:
                pass
        return backoff_delay(attempt + 1, self.backoff, self.backoff_max, jitter="full")

    async def request(
        self, method: str, url: str, *, idempotent: bool | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send one request with the policy in the module docstring. ``kwargs`` go to httpx
        (``json=``, ``params=``, ``headers=``, ``content=``...)."""
        method = method.upper()
        parts = urlsplit(url)
        target = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        breaker = self.breakers.get(f"http:{target}", self.breaker_config, profile="http")
        retryable = idempotent if idempotent is not None else method in IDEMPOTENT_METHODS
        tried: set[str] = set()
        attempt = 0
        last_blocked: str | None = None
        while True:
            proxy: Proxy | None = None
            if self.pool is not None:
                try:
                    proxy = self.pool.acquire(exclude=tried)
                except NoProxyAvailable:
                    if last_blocked is not None:
                        raise ProxyBlocked(
                            f"PROXY_BLOCKED: {target} blocked every egress proxy tried "
                            f"({len(tried)}); last: {last_blocked}",
                            target=target,
                        ) from None
                    raise ProxyUnavailable(
                        f"no active egress proxy for {target}", target=target
                    ) from None
            started = time.perf_counter()
            outcome = "ok"
            response: httpx.Response | None = None
            error: BaseException | None = None
            try:
                async with breaker.guard():
                    try:
                        response = await self._client(proxy).request(method, url, **kwargs)
                    except (httpx.ProxyError, httpx.ConnectError, httpx.ConnectTimeout) as exc:
                        if proxy is None:
                            raise
                        # The proxy's fault, not the target's: the breaker must not count it.
                        raise _ProxyFailed(exc) from exc
                    if response.status_code >= 500:
                        raise _ServerError(response)
            except BreakerOpenError:
                OUTBOUND_REQUESTS.labels(target, "breaker_open").inc()
                if proxy is not None and self.pool is not None:
                    self.pool.release(proxy)
                raise
            except _ServerError as exc:
                response = exc.response
                outcome = "server_error"
            except _ProxyFailed as exc:
                error = exc.error
                outcome = "proxy_error"
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error = exc
                outcome = "transport_error"
            except httpx.TimeoutException as exc:
                error = exc
                outcome = "timeout"
            except httpx.TransportError as exc:
                error = exc
                outcome = "transport_error"
            except BaseException:
                if proxy is not None and self.pool is not None:
                    self.pool.release(proxy)
                raise
            OUTBOUND_DURATION.labels(target).observe(time.perf_counter() - started)

            # -- the proxy refused our credentials (plain-HTTP forwarding answers 407; a
            # CONNECT tunnel raises ProxyError instead): the proxy's failure, not the target's.
            if (
                response is not None
                and proxy is not None
                and response.status_code == 407
                and outcome == "ok"
            ):
                await response.aclose()
                response = None
                error = httpx.ProxyError("407 Proxy Authentication Required")
                outcome = "proxy_error"
            # -- a block: that proxy's address is refused; fail over at once --------------
            if response is not None and proxy is not None and self.pool is not None:
                reason = self._block_reason(response)
                if reason is not None:
                    OUTBOUND_REQUESTS.labels(target, "blocked").inc()
                    self.pool.blocked(proxy, status=response.status_code, reason=reason)
                    tried.add(proxy.id)
                    last_blocked = f"{proxy.id} {reason}"
                    await response.aclose()
                    continue
            if outcome == "ok" and response is not None:
                OUTBOUND_REQUESTS.labels(
                    target, "client_error" if response.status_code >= 400 else "ok"
                ).inc()
                if proxy is not None and self.pool is not None:
                    self.pool.success(proxy)
                return response

            OUTBOUND_REQUESTS.labels(target, outcome).inc()
            if proxy is not None and self.pool is not None:
                if outcome == "proxy_error":
                    self.pool.failure(proxy, f"{type(error).__name__}: {error}")
                    tried.add(proxy.id)
                    if attempt < self.retries + len(self.pool):
                        attempt += 1
                        continue  # nothing reached the target: safe for any method
                elif outcome == "server_error":
                    self.pool.success(proxy)  # the proxy did its job; the target failed
                else:
                    self.pool.release(proxy)
            retry = retryable and attempt < self.retries
            if outcome == "server_error":
                assert response is not None
                if not (retry and response.status_code in RETRY_STATUSES):
                    return response
            elif not retry:
                detail = self._scrub(f"{type(error).__name__}: {error}")
                log.warning(
                    "http.outbound.failed",
                    target=target,
                    method=method,
                    attempts=attempt + 1,
                    proxy=proxy.id if proxy else None,
                    error=detail,
                )
                error_type = OutboundTimeout if outcome == "timeout" else OutboundError
                if outcome == "proxy_error":
                    error_type = ProxyUnavailable
                raise error_type(
                    f"{method} {target} failed after {attempt + 1} attempt(s): {detail}",
                    target=target,
                ) from None
            delay = self._delay(attempt, response)
            if response is not None:
                await response.aclose()
            attempt += 1
            log.info(
                "http.outbound.retry",
                target=target,
                method=method,
                attempt=attempt,
                outcome=outcome,
                delay_s=round(delay, 3),
            )
            await asyncio.sleep(delay)

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)

    def status(self) -> dict[str, Any]:
        """Proxy health for admin pages (no credentials)."""
        return {"proxies": self.pool.status() if self.pool is not None else []}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def client_from_settings(settings: Settings, **overrides: Any) -> OutboundClient:
    """An ``OutboundClient`` configured by the HTTP_ settings (egress proxies included)."""
    urls = [
        url.strip()
        for url in settings.HTTP_EGRESS_PROXIES.get_secret_value().split(",")
        if url.strip()
    ]
    options: dict[str, Any] = {
        "proxies": ProxyPool(
            urls,
            cooldown=settings.HTTP_PROXY_COOLDOWN.total_seconds(),
            max_failures=settings.HTTP_PROXY_MAX_FAILURES,
        )
        if urls
        else None,
        "connect_timeout": settings.HTTP_CONNECT_TIMEOUT.total_seconds(),
        "read_timeout": settings.HTTP_READ_TIMEOUT.total_seconds(),
        "retries": settings.HTTP_RETRIES,
        "backoff": settings.HTTP_BACKOFF.total_seconds(),
        "backoff_max": settings.HTTP_BACKOFF_MAX.total_seconds(),
    }
    options.update(overrides)
    return OutboundClient(**options)
