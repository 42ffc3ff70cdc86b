"""Settings of the kit's building blocks: cache, rate limits, jobs, breakers, outbound HTTP
and alerts."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode

from surge.config._types import CsvList

#: Constant files and pages the app serves (no data, no per-caller work): the console's CSS and
#: JS, the docs' bundles, the docs and panel pages, the schema. They spend ``static-1m`` per
#: IP, not a caller's tier budget (ADR 0054); the default of ``RATELIMIT_STATIC_ROUTES``.
STATIC_PAGES = ["/admin/static/*", "/docs-assets/*", "/docs", "/redoc", "/openapi.json", "/panel"]


class KitSettings(BaseSettings):
    """``surge.kit``'s settings (a section of ``surge.config.Settings``)."""

    # --- cache (kit.cache) ---------------------------------------------------------------
    CACHE_NAMESPACE: str = "surge:cache"
    """Redis key prefix of the cache; processes sharing it share L2 and invalidations."""
    CACHE_L1_MAX_ENTRIES: int = 50_000
    """Seed 003: entries kept in process memory (LRU); 0 disables L1."""
    CACHE_L1_TTL: timedelta = timedelta(seconds=60)
    """L1 trusts an entry at most this long before asking Redis again (defence in depth
    behind pub/sub invalidation and the resync loop)."""
    CACHE_TTL: timedelta = timedelta(minutes=5)
    """Seeds 001/003: default freshness of a cached value."""
    CACHE_TTL_JITTER: float = 0.1
    """Up to this fraction is shaved off each TTL so values written together expire apart."""
    CACHE_STALE_WHILE_REVALIDATE: timedelta = timedelta(seconds=30)
    """Past its TTL by less than this, a value is served stale while one refresh runs."""
    CACHE_MAX_STALE: timedelta = timedelta(hours=1)
    """Past its TTL by less than this, a value is served stale when the loader fails."""
    CACHE_FAIL_SAFE_THROTTLE: timedelta = timedelta(seconds=5)
    """After a loader failure answered with a stale value, the loader rests this long."""
    CACHE_LEASE: timedelta = timedelta(seconds=2)
    """Cross-process load lease: other processes wait at most this long for the holder."""
    CACHE_MAX_VALUE_BYTES: int = 1024 * 1024
    """Encoded values larger than this are not written to Redis (L1 only)."""
    CACHE_RESYNC_INTERVAL: timedelta = timedelta(seconds=1)
    """How often each process checks it missed no invalidation message (one MGET)."""

    # --- rate limits (kit.ratelimit) -----------------------------------------------------
    RATELIMIT_ENABLED: bool = True
    """Apply the global rate-limit middleware. Off: only ``RouteLimit`` dependencies limit."""
    RATELIMIT_POLICIES: list[dict[str, Any]] = Field(
        default_factory=lambda: [
            # seed 004: anonymous 50 / 15 min per IP; tiers 300 / 500 / 1 000 per 15 min.
            # (per defaults to subject_or_ip: the anonymous tier is limited per client IP.)
            # The constant files and pages (RATELIMIT_STATIC_ROUTES) are merged in at start:
            # static-1m per IP, left out of every tier policy (ADR 0054, 0060).
            {"name": "anonymous-15m", "limit": 50, "period": "PT15M", "tiers": ["anonymous"]},
            {"name": "tier-free-15m", "limit": 300, "period": "PT15M", "tiers": ["free"]},
            {"name": "tier-plus-15m", "limit": 500, "period": "PT15M", "tiers": ["plus"]},
            {"name": "tier-pro-15m", "limit": 1000, "period": "PT15M", "tiers": ["pro"]},
            # seed 003: 1 000 / min per user, 10 000 / min per IP
            {"name": "subject-1m", "limit": 1000, "period": "PT1M", "per": "subject"},
            {"name": "ip-1m", "limit": 10000, "period": "PT1M", "per": "ip"},
            # seed 004 endpoint limits: applied where a route names them (RouteLimit)
            {"name": "endpoint-20-per-minute", "limit": 20, "period": "PT1M", "scope": "route"},
            {"name": "endpoint-50-per-minute", "limit": 50, "period": "PT1M", "scope": "route"},
            {"name": "endpoint-10-per-hour", "limit": 10, "period": "PT1H", "scope": "route"},
        ]
    )
    """Rate-limit policies (JSON list of ``surge.kit.ratelimit.RatePolicy``), validated at
    start-up. The defaults reproduce seeds 003 and 004. Whether these or an operator's own,
    ``RATELIMIT_STATIC_ROUTES`` is merged in (``kit.ratelimit.with_constant_routes``): a
    ``static-1m`` policy (300 a minute per IP) unless one of that name is listed, and those
    routes left out of every policy with ``tiers`` that does not set ``except_routes``."""
    RATELIMIT_STATIC_ROUTES: CsvList[str] = Field(default_factory=lambda: list(STATIC_PAGES))
    """Constant files and pages (fnmatch patterns): they spend ``static-1m`` per IP, not a
    caller's tier budget (ADR 0054, 0060). Empty: no ``static-1m``, policies as listed."""
    RATELIMIT_EXEMPT_PATHS: CsvList[str] = Field(
        default_factory=lambda: [
            "/livez",
            "/readyz",
            "/metrics",
            "/api/health",
            # Signed provider callbacks come from a few provider addresses: the anonymous
            # 50 / 15 min would turn a busy hour into days of provider retries. The HMAC,
            # checked before any database work, is their gate (ADR 0018).
            "/api/v1/webhooks/payments",
        ]
    )
    """Paths (or fnmatch patterns) never limited: health probes must always get through."""
    RATELIMIT_LOCAL_PROCESSES: int | None = None
    """While Redis is down each process allows limit / this many (None = WEB_WORKERS)."""
    RATELIMIT_KEY_PREFIX: str = "rl:"
    """Prefix of every rate-limit key in Redis."""
    RATELIMIT_LEASE: bool = True
    """Each process leases a few units of a budget and spends them in memory (ADR 0028):
    most decisions need no Redis round trip; a window can pass at most processes × lease
    units past a limit. A policy's ``lease`` (0: exact) overrides the size; False: exact."""

    # --- jobs (kit.jobs) -----------------------------------------------------------------
    JOBS_LEASE: timedelta = timedelta(seconds=120)
    """A running attempt's lease (seed 000 lockDuration 120 s), renewed every lease/4; a job
    whose lease expired is stalled and re-run."""
    JOBS_STALLED_CHECK: timedelta = timedelta(seconds=30)
    """How often workers look for expired leases (seed 000 stalledInterval 30 s): a dead
    worker's job is re-run within lease + this."""
    JOBS_MAX_STALLED: int = 2
    """A job that stalled more than this many times is failed (seed 000 maxStalledCount)."""
    JOBS_MAX_ATTEMPTS: int = 3
    """Default starts per job before it is failed (seed 002: 3 retries); per job via @job."""
    JOBS_BACKOFF: timedelta = timedelta(seconds=5)
    """First retry delay; doubles per attempt (with jitter) up to JOBS_BACKOFF_MAX."""
    JOBS_BACKOFF_MAX: timedelta = timedelta(hours=1)
    """Longest retry delay."""
    JOBS_CONCURRENCY: int = 8
    """Jobs run at once per worker process (seed 000: 8)."""
    JOBS_PROCESSES: int = 2
    """Worker processes of `surge worker` (seed 000 runs 8; this 2-core default keeps
    8 × DB_POOL_MAX connections from crowding PostgreSQL)."""
    JOBS_QUEUES: CsvList[str] = Field(default_factory=list)
    """Queues the workers take jobs from (comma-separated); empty = every registered queue."""
    JOBS_RATE_LIMITS: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: {"operations": "50/min"}
    )
    """Global start-rate limits per queue, across all processes: `operations=50/min,email=10/s`
    (or JSON; empty: none). Seed 000: 50 operations/min per provider (the default)."""
    JOBS_MODULES: CsvList[str] = Field(default_factory=list)
    """Extra modules to import for their @job registrations (besides surge.<domain>.jobs)."""
    JOBS_POLL_INTERVAL: timedelta = timedelta(seconds=1)
    """Idle workers are woken by LISTEN/NOTIFY; this poll catches delayed jobs coming due."""
    JOBS_SHUTDOWN_GRACE: timedelta = timedelta(seconds=30)
    """On SIGTERM running jobs get this long to finish; the rest are put back in the queue."""
    JOBS_RETENTION: timedelta = timedelta(days=7)
    """Succeeded and cancelled jobs are deleted after this; failed jobs are kept."""

    @field_validator("JOBS_RATE_LIMITS", mode="before")
    @classmethod
    def _jobs_rate_limits(cls, value: Any) -> Any:
        if isinstance(value, str):
            import json

            if value.strip().startswith("{"):
                return json.loads(value)
            pairs = (part.split("=", 1) for part in value.split(",") if part.strip())
            return {queue.strip(): rule.strip() for queue, rule in pairs}
        return value

    # --- breakers, outbound HTTP, alerts (kit.breaker, kit.http, kit.telemetry.alerts) ---
    BREAKER_FAILURE_RATE: float = 0.5
    """Default breaker: open when this share (0-1) of the window's calls failed."""
    BREAKER_SLOW_CALL_RATE: float = 1.0
    """Default breaker: open when this share of the window's calls were slow (1.0 = all)."""
    BREAKER_SLOW_CALL_DURATION: timedelta = timedelta(seconds=5)
    """A call longer than this counts as slow."""
    BREAKER_WINDOW_SIZE: int = 50
    """Calls in the default (count-based) sliding window."""
    BREAKER_MINIMUM_CALLS: int = 10
    """No judgement before the window holds this many calls (2 failures of 2 never trip)."""
    BREAKER_OPEN_DURATION: timedelta = timedelta(seconds=30)
    """How long an open breaker refuses calls before letting trial calls through."""
    BREAKER_HALF_OPEN_CALLS: int = 3
    """Trial calls in half-open; their outcome alone closes or re-opens the breaker."""
    BREAKER_FLEET: bool = True
    """Share openings across processes through Redis (each process still decides alone)."""
    BREAKER_FLEET_QUORUM: int = 1
    """Processes that must be open before every process opens (1: any one opens all)."""
    HTTP_CONNECT_TIMEOUT: timedelta = timedelta(seconds=5)
    """Outbound HTTP connect timeout (to the target, or to the egress proxy)."""
    HTTP_READ_TIMEOUT: timedelta = timedelta(seconds=30)
    """Outbound HTTP read (and write) timeout."""
    HTTP_RETRIES: int = 2
    """Extra attempts for idempotent outbound calls (timeouts, dropped connections, 502-504)."""
    HTTP_BACKOFF: timedelta = timedelta(milliseconds=200)
    """Base of the exponential backoff with full jitter between outbound retries."""
    HTTP_BACKOFF_MAX: timedelta = timedelta(seconds=5)
    """Cap of one backoff delay (and of an honoured Retry-After)."""
    HTTP_EGRESS_PROXIES: SecretStr = SecretStr("")
    """Comma-separated egress proxy URLs (``http://user:pass@host:port``); secret because
    they carry credentials. Empty: outbound calls leave directly."""
    HTTP_PROXY_COOLDOWN: timedelta = timedelta(minutes=5)
    """A blocked or failing proxy rests this long before one probe request."""
    HTTP_PROXY_MAX_FAILURES: int = 3
    """Consecutive connection failures that make a proxy inactive (a block does at once)."""
    ALERT_WEBHOOK_URL: SecretStr = SecretStr("")
    """Slack-compatible incoming webhook for alerts; empty = alert evaluation off."""
    ALERT_INTERVAL: timedelta = timedelta(seconds=15)
    """How often alert rules are evaluated (one Prometheus scrape interval)."""
    ALERT_COOLDOWN: timedelta = timedelta(minutes=5)
    """After a message, a rule stays silent this long (then one reminder if still firing)."""
    ALERT_WEBHOOK_RETRIES: int = 3
    """Extra delivery attempts per alert message."""
    ALERT_RESPONSE_P95: timedelta = timedelta(milliseconds=200)
    """Seed 003: alert when p95 response time is above this (its target is 120 ms; seed 002's
    1 s would page long after users noticed)."""
    ALERT_ERRORS_PER_MINUTE: float = 10
    """Seed 002: alert when 5xx responses per minute are above this."""
    ALERT_MEMORY_RATIO: float = 0.9
    """Seed 002: alert when machine memory in use is above this share."""
    ALERT_JOBS_LAG: timedelta = timedelta(seconds=60)
    """Alert when the oldest ready job has waited longer than this."""
    ALERT_SHED_RATIO: float = 0.01
    """Warn when admission control refuses more than this share of arriving requests (5 min):
    one in a hundred users told to come back is already a capacity problem."""
    ALERT_SHED_RATIO_CRITICAL: float = 0.1
    """Page when admission control refuses more than this share of arriving requests."""
