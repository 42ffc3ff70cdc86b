"""Surge's configuration: one Settings class, one ``settings``.

Every variable is read with the ``SURGE_`` prefix (``SURGE_DB_POOL_MAX``) from the
environment or ``.env``. The three server URLs are also accepted without the prefix
(``DATABASE_URL``, ``DATABASE_REPLICA_URLS``, ``REDIS_URL``) because every PaaS sets them so.
When a URL is empty, Surge starts its own server from pip packages (see ``surge.kit.embedded``).
"""

from __future__ import annotations

import os
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_SECRET = "dev-only-secret-change-me-dev-only-secret-change-me"

_Item = TypeVar("_Item")


def split_csv(value: Any) -> Any:
    """``"a, b,,c"`` → ``["a", "b", "c"]``; a list (from code or JSON) passes as it is."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


#: A list setting written comma-separated in the environment (``SURGE_JOBS_QUEUES=a,b``).
CsvList = Annotated[list[_Item], NoDecode, BeforeValidator(split_csv)]


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


class Settings(BaseSettings):
    """All of Surge's settings. Durations are ``timedelta`` (``30``, ``"PT30S"`` or ``"00:00:30"``)."""

    model_config = SettingsConfigDict(
        env_prefix="SURGE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    ENV: Environment = Environment.development
    """development | test | production. Outside development, default secrets are refused."""
    DATA_DIR: Path = Path(".data")
    """Where the embedded PostgreSQL and Redis keep their files (reused across runs)."""
    SECRET_KEY: SecretStr = SecretStr(DEV_SECRET)
    """Signs tokens and cursors. Must be set (≥ 32 chars) outside development."""

    # --- servers -------------------------------------------------------------------------
    DATABASE_URL: str = Field(
        default="", validation_alias=AliasChoices("SURGE_DATABASE_URL", "DATABASE_URL")
    )
    """postgresql+asyncpg://user:pass@host:port/db; empty = embedded PostgreSQL."""
    DATABASE_REPLICA_URLS: CsvList[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("SURGE_DATABASE_REPLICA_URLS", "DATABASE_REPLICA_URLS"),
    )
    """Comma-separated read replicas; read sessions go there, primary when they are down."""
    REDIS_URL: str = Field(
        default="", validation_alias=AliasChoices("SURGE_REDIS_URL", "REDIS_URL")
    )
    """redis://host:port/db; empty = embedded Redis."""

    # --- database pool (seed 000: max 20, min 5, idle 30 s, connect timeout 5 s) ---------
    DB_POOL_MAX: int = 20
    """Connections per process, at most. 20 × processes must stay under max_connections."""
    DB_POOL_MIN: int = 5
    """Connections kept open (warm) per process even when idle."""
    DB_POOL_IDLE_TIMEOUT: timedelta = timedelta(seconds=30)
    """A connection idle longer than this is closed, down to DB_POOL_MIN."""
    DB_POOL_TIMEOUT: timedelta = timedelta(seconds=5)
    """How long a request waits for a free connection before 503."""
    DB_CONNECT_TIMEOUT: timedelta = timedelta(seconds=5)
    DB_STATEMENT_TIMEOUT: timedelta = timedelta(seconds=30)
    """Server-side statement_timeout for every connection (0 = none)."""
    DB_SLOW_QUERY: timedelta = timedelta(milliseconds=500)
    """Seed 002: a query slower than this is logged and counted."""
    DB_PGBOUNCER: bool = False
    """Behind PgBouncer in transaction mode: disables asyncpg's prepared-statement cache
    (prepared statements are per server connection, which PgBouncer swaps per transaction)."""
    DB_REPLICA_RETRY: timedelta = timedelta(seconds=5)
    """After a replica fails, reads go to the primary for this long before trying it again."""

    # --- redis (seed 000: backoff 100 ms × attempt up to 3 s, give up after 10) ----------
    REDIS_SOCKET_TIMEOUT: timedelta = timedelta(milliseconds=1000)
    REDIS_CONNECT_TIMEOUT: timedelta = timedelta(milliseconds=500)
    REDIS_BACKOFF_STEP: timedelta = timedelta(milliseconds=100)
    REDIS_BACKOFF_MAX: timedelta = timedelta(seconds=3)
    REDIS_MAX_RECONNECT_ATTEMPTS: int = 10
    """After this many failed reconnects in a row Surge logs `redis.gave_up` and keeps
    probing at REDIS_BACKOFF_MAX instead of stopping for good (ADR 0004)."""
    REDIS_MAX_CONNECTIONS: int = 64

    # --- scale out (issue 18): Redis through Sentinel, replica routing (ADR 0022) --------
    REDIS_SENTINELS: CsvList[str] = Field(default_factory=list)
    """Sentinels as ``host:port,host:port``: when set, the gateway asks them for the primary
    of REDIS_SENTINEL_MASTER on every new connection and after a failover (REDIS_URL then
    only carries the database number and credentials)."""
    REDIS_SENTINEL_MASTER: str = "surge"
    """The name the Sentinels monitor the primary under (``sentinel monitor NAME ...``)."""
    DB_STICKY_READS: timedelta = timedelta(seconds=30)
    """After a write, reads keyed by the same subject go to the primary — or to a replica
    whose ``pg_last_wal_replay_lsn()`` has reached that write — for at most this long (GitLab's
    30 s). 0 turns read-your-writes off."""
    DB_REPLICA_MAX_LAG: int = 16 * 1024 * 1024
    """A replica whose replay is this many bytes of WAL behind the primary gets no reads."""
    DB_REPLICA_POLL: timedelta = timedelta(seconds=1)
    """How often each replica's replay position (and the primary's) is read (lag metric)."""

    # --- web -----------------------------------------------------------------------------
    HOST: str = "127.0.0.1"
    PORT: int = 8000
    WEB_WORKERS: int = Field(default_factory=lambda: os.cpu_count() or 1)
    REQUEST_BODY_LIMIT: int = 1024 * 1024
    """Bytes; larger bodies get 413 without being read whole."""
    REQUEST_TIMEOUT: timedelta = timedelta(seconds=30)
    """A request running longer is cancelled and answered 504."""
    SHUTDOWN_GRACE: timedelta = timedelta(seconds=10)
    """In-flight requests get this long to finish on SIGTERM / Ctrl-C."""
    TRUSTED_PROXIES: CsvList[str] = Field(default_factory=lambda: ["127.0.0.1"])
    """Peers whose X-Forwarded-For is believed (comma-separated IPs or CIDRs)."""
    LOG_LEVEL: str = "INFO"
    LOG_JSON: bool | None = None
    """JSON logs; default: JSON unless stderr is a terminal."""
    LOG_ACCESS: bool = False
    """One log line per request. Off by default: errors and slow requests are always logged."""
    SLOW_REQUEST: timedelta = timedelta(seconds=1)
    """Seed 002 alert threshold: a request slower than this is logged."""
    OTEL_ENABLED: bool = False
    """FastAPI's native OpenTelemetry spans and metrics, exported by the OpenTelemetry SDK
    you configure. Off by default: Surge's metrics are Prometheus (``/metrics``) and it
    propagates ``traceparent`` itself; off also saves FastAPI's per-request provider
    lookups (ADR 0011)."""

    # --- health --------------------------------------------------------------------------
    HEALTH_CHECK_TIMEOUT: timedelta = timedelta(milliseconds=1500)
    """Each health check's own timeout; checks run concurrently."""

    # --- metrics -------------------------------------------------------------------------
    METRICS_DIR: Path | None = None
    """prometheus multiprocess directory; set by `surge up`/`serve` when >1 process."""

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
    start-up. The defaults reproduce seeds 003 and 004."""
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

    # --- identity ------------------------------------------------------------------------
    AUTH_ACCESS_TTL: timedelta = timedelta(minutes=15)
    """Access JWT lifetime (seed 004). Also how long a revocation must be remembered."""
    AUTH_REFRESH_TTL: timedelta = timedelta(days=30)
    """A session (refresh-token family) expires this long after its last refresh."""
    AUTH_MAX_SESSIONS: int = 5
    """Seed 004: live sessions per user; the next login revokes the oldest (by creation)."""
    AUTH_JWT_ISSUER: str = "surge"
    """``iss`` of every access token; tokens from another issuer are refused."""
    AUTH_JWT_AUDIENCE: str = "surge-api"
    """``aud`` of every access token; tokens minted for another audience are refused."""
    AUTH_SIGNING_KEYS: SecretStr = SecretStr("")
    """Key ring ``kid=secret,kid=secret`` (≥ 32 bytes each): the first signs, all verify.
    Rotate by prepending a key, then drop the old one after AUTH_ACCESS_TTL. Empty: one key
    derived from SECRET_KEY."""
    AUTH_ARGON2_TIME_COST: int = 3
    """Argon2id passes (RFC 9106 option 2). Raising it rehashes each password at next login."""
    AUTH_ARGON2_MEMORY_KIB: int = 65536
    """Argon2id memory (64 MiB, RFC 9106 option 2)."""
    AUTH_ARGON2_PARALLELISM: int = 4
    """Argon2id lanes."""
    AUTH_LOGIN_WINDOW: timedelta = timedelta(minutes=15)
    """Window over which failed logins are counted for brute-force protection."""
    AUTH_LOGIN_MAX_FAILURES_ACCOUNT: int = 10
    """Failed logins per account per window before further attempts get 429."""
    AUTH_LOGIN_MAX_FAILURES_IP: int = 100
    """Failed logins per client IP per window before further attempts get 429."""
    AUTH_MFA_ISSUER: str = "Surge"
    """Issuer shown by authenticator apps for TOTP enrolment."""
    IDENTITY_PLAN_FEATURES: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "free": ["basic"],
            "plus": ["basic", "export", "priority_support"],
            "pro": ["basic", "export", "priority_support", "api_access", "analytics"],
            "ultra": ["basic", "export", "priority_support", "api_access", "analytics", "sso"],
        }
    )
    """Plans and the features they grant (JSON object). ``free`` must exist: it is what a
    user without a live subscription gets, and what is answered when nothing can be read."""
    IDENTITY_PLAN_RATE_TIERS: dict[str, str] = Field(
        default_factory=lambda: {"free": "free", "plus": "plus", "pro": "pro", "ultra": "ultra"}
    )
    """Plan → rate-limit tier name (the kit.ratelimit policy); a missing plan uses its own name."""
    IDENTITY_PRIVILEGE_L1_SIZE: int = 50_000
    """Seed 003: privileges kept in each process's memory (LRU)."""
    IDENTITY_PRIVILEGE_L1_TTL: timedelta = timedelta(seconds=60)
    """How long a memory entry is served without asking Redis. Plan changes reach every
    process at once through kit.cache's pub/sub; this bounds how long memory alone decides."""
    IDENTITY_PRIVILEGE_TTL: timedelta = timedelta(minutes=5)
    """Seed 003: privileges kept in Redis."""
    IDENTITY_PRIVILEGE_STALE: timedelta = timedelta(hours=1)
    """How long an expired in-memory entry may still be served while PostgreSQL is down."""
    IDENTITY_REFRESH_INTERVAL: timedelta = timedelta(minutes=1)
    """Seed 003: ``REFRESH MATERIALIZED VIEW CONCURRENTLY active_subscriptions`` period."""
    IDENTITY_WARM_USERS: int = 20_000
    """Most recently active users whose privileges are loaded into memory at start. Above
    the active population (seed 003: 10 000 signed in): at 1 000, a restart under load sent
    every other active user's first request to PostgreSQL at once (issue 19)."""

    # ---- capacity ----------------------------------------------------------------------
    HTTP_KEEPALIVE_TIMEOUT: timedelta = timedelta(seconds=75)
    """uvicorn ``timeout_keep_alive``: an idle keep-alive connection is closed after this. It
    must exceed the clients' think time (seed 003: 5-10 s between requests), or nearly every
    request pays a new TCP handshake; 75 s is nginx's default and outlasts the usual load
    balancer idle timeout (60 s), so the balancer, not Surge, closes first."""
    HTTP_BACKLOG: int = 16384
    """uvicorn ``backlog`` (listen queue). The kernel caps it at ``net.core.somaxconn``
    (``surge serve`` warns when that is lower): 10 000 clients connecting at once overflow
    4 096 and wait for SYN retransmits (1, 3, 7... s)."""
    CACHE_EARLY_REFRESH: float = 0.1
    """kit.cache: in the last this fraction of an entry's TTL, a hit may start a background
    refresh (probability rising to 1 at expiry), so hot entries are renewed before they
    expire instead of all reloading as a wave (0 turns it off). The L1 trust window
    (``CACHE_L1_TTL``, ``IDENTITY_PRIVILEGE_L1_TTL``) is jittered by ``CACHE_TTL_JITTER``."""
    HTTP_SERVER_TIMING: bool = True
    """Send ``Server-Timing: queue;dur=…, app;dur=…`` on every response (where the time went;
    ``surge load`` reads it). Turn off to hide server timings from clients."""

    # --- wallet --------------------------------------------------------------------------
    WALLET_CURRENCY: str = "USD"
    """ISO 4217 code of partner wallets; every amount is an integer of its minor unit."""
    WALLET_WITHDRAWAL_MIN: int = 1_000
    """Smallest withdrawal, in minor units (1 000 = 10.00)."""
    WALLET_WITHDRAWAL_MAX: int = 1_000_000
    """Largest single withdrawal, in minor units (1 000 000 = 10 000.00)."""
    WALLET_REVENUE_EVENT_MAX: int = 10**12
    """Largest |profit| of one revenue event, in minor units (10¹² = 10 000 000 000.00).
    A bound keeps every balance far from BIGINT's end: one event near 2⁶³ would overflow
    the revenue account and stop every later earnings batch."""
    WALLET_COMMISSION_BPS: int = 1_000
    """Default commission on a partner's shown profit, in basis points (seed 001: 10 %)."""
    WALLET_EARNINGS_BATCH: int = 50
    """Partners credited per earnings job (seed 001: batches of 50)."""
    WALLET_STATS_TTL: timedelta = timedelta(minutes=5)
    """How long a partner's dashboard stats stay cached (seed 001: 5 min)."""
    WALLET_STATS_REFRESH: timedelta = timedelta(minutes=5)
    """How often the `wallet_stats` materialized view is refreshed concurrently."""
    WALLET_PARTITION_MONTHS_AHEAD: int = 3
    """Monthly history partitions kept created ahead of time by the upkeep job."""

    # ---- console ------------------------------------------------------------------------
    # (issue 16: operator's console, alerts from one source, service API keys)
    ALERT_ERROR_RATIO: float = 0.01
    """Seed 003: alert when more than this share of responses are 5xx (over 5 min)."""
    ALERT_CACHE_HIT_RATIO: float = 0.9
    """Seed 003: alert when a cache's hit ratio (L1 or L2 hits / lookups) falls below this."""
    CONSOLE_SESSION_TTL: timedelta = timedelta(hours=8)
    """How long a console sign-in (its HttpOnly cookie) lasts without a new sign-in."""
    CONSOLE_SAMPLE_INTERVAL: timedelta = timedelta(seconds=5)
    """How often each API process records its metrics into the console's time series."""
    CONSOLE_SERIES_RETENTION: timedelta = timedelta(hours=1)
    """How much history the console's charts keep (in Redis, trimmed by time)."""
    CREDENTIAL_ROTATION_GRACE: timedelta = timedelta(hours=1)
    """After a service key is rotated, the old key keeps working this long (redeploy time)."""
    # ---- end console --------------------------------------------------------------------

    # ---- operations ----------------------------------------------------------------------
    OPERATIONS_PROVIDER_URL: str = ""
    """Base URL of the upstream provider's website (``surge up`` points it at the simulator)."""
    OPERATIONS_PROXY_URLS: CsvList[str] = Field(default_factory=list)
    """Egress proxies ``surge seed-demo`` registers (comma-separated); the fleet then reads
    the ``operations_proxies`` table, managed at ``/api/admin/proxies``."""
    OPERATIONS_SESSION_TTL: timedelta = timedelta(minutes=120)
    """Seed 000 4.2: a provider session (cookies, per account and proxy) kept in Redis."""
    OPERATIONS_ACCOUNT_LEASE: timedelta = timedelta(seconds=120)
    """How long a job holds a provider account (renewed never: a job ends sooner; a crashed
    worker's account is free again after this, the same span as JOBS_LEASE)."""
    OPERATIONS_PROXY_BACKOFF: timedelta = timedelta(seconds=300)
    """First re-check delay of a blocked proxy; doubled per block, equal jitter
    (scrapy-rotating-proxies: base 300 s)..."""
    OPERATIONS_PROXY_BACKOFF_MAX: timedelta = timedelta(seconds=3600)
    """... up to this cap (scrapy-rotating-proxies: 3 600 s)."""
    OPERATIONS_PROXY_TRIES: int = 3
    """Proxies one attempt tries before it gives up and the job is retried later."""
    OPERATIONS_TIMEOUT: timedelta = timedelta(seconds=15)
    """Connect/read timeout of one provider call."""
    OPERATIONS_MAX_ATTEMPTS: int = 6
    """Attempts of an operation job; after the last, the operation fails (reservation
    released) or, when the provider may have done the work, goes to ``needs_review``."""
    OPERATIONS_RETRY_BACKOFF: timedelta = timedelta(seconds=1)
    """First delay before an operation's next attempt; doubled per attempt (with jitter)..."""
    OPERATIONS_RETRY_BACKOFF_MAX: timedelta = timedelta(seconds=30)
    """... up to this."""
    OPERATIONS_SIGNAL_PRICE: int = 100
    """Price of a signal refresh, in minor units (1.00)."""

    # ---- payments -----------------------------------------------------------------------
    PAYMENTS_PROVIDER_URL: str = ""
    """Base URL of the payment provider's API (Stripe-shaped; ``surge up`` points it at
    ``surge.sim.payments``). Empty: top-ups answer 503."""
    PAYMENTS_API_KEY: SecretStr = SecretStr("sk_test_surge")
    """Bearer key for the provider's API."""
    PAYMENTS_WEBHOOK_SECRETS: CsvList[SecretStr] = Field(
        default_factory=lambda: [SecretStr("whsec_surge_dev")]
    )
    """Comma-separated webhook signing secrets. A signature made with any of them is
    accepted: during a rotation list the new and the old one, then drop the old."""
    PAYMENTS_WEBHOOK_TOLERANCE: timedelta = timedelta(seconds=300)
    """A signed timestamp further than this from now is refused (Stripe's default, 300 s)."""
    PAYMENTS_CURRENCY: str = "USD"
    """The only currency top-ups accept (the wallets' currency)."""
    PAYMENTS_TOPUP_MIN: int = 500
    """Smallest top-up in minor units (500 = 5.00; below it card fees eat the payment)."""
    PAYMENTS_TOPUP_MAX: int = 1_000_000
    """Largest top-up in minor units (1 000 000 = 10 000.00)."""
    PAYMENTS_TIMEOUT: timedelta = timedelta(seconds=10)
    """Read timeout of one call to the provider."""
    PAYMENTS_RECONCILE_AFTER: timedelta = timedelta(minutes=2)
    """A top-up still open this long after its last change is asked about at the provider
    by the reconciliation job (a lost webhook costs minutes, not money)."""
    PAYMENTS_RECONCILE_BATCH: int = 100
    """Open top-ups asked about per reconciliation run."""
    PAYMENTS_SCAN_WINDOW: timedelta = timedelta(minutes=30)
    """The provider scan (every 5 minutes) lists the intents created between this long ago
    and PAYMENTS_RECONCILE_AFTER ago, and settles any Surge has no row for (its request died
    before commit and every webhook was lost) or still shows open."""
    PAYMENTS_EVENT_MAX_ATTEMPTS: int = 5
    """Failed processings of one event before it is dead-lettered (admin view, retry)."""
    PAYMENTS_EVENT_RETRY: timedelta = timedelta(seconds=5)
    """Delay before processing a failed event again (doubled per attempt)."""

    # ---- notifications ---------------------------------------------------------------
    NOTIFY_SMTP_HOST: str = "127.0.0.1"
    """The SMTP relay e-mail is handed to (`surge up` points it at its local aiosmtpd)."""
    NOTIFY_SMTP_PORT: int = 8025
    """The relay's port."""
    NOTIFY_SMTP_USERNAME: str = ""
    """SMTP AUTH user; empty = no authentication."""
    NOTIFY_SMTP_PASSWORD: SecretStr = SecretStr("")
    """SMTP AUTH password."""
    NOTIFY_SMTP_TLS: str = "none"
    """`none`, `starttls` (submission, port 587) or `tls` (implicit TLS, port 465)."""
    NOTIFY_SMTP_TIMEOUT: timedelta = timedelta(seconds=30)
    """Per-command timeout; a relay slower than this counts as a transient failure."""
    NOTIFY_SMTP_CONNECTIONS: int = 8
    """SMTP connections kept open per worker process (one message at a time on each)."""
    NOTIFY_FROM: str = "Surge <no-reply@surge.localhost>"
    """The From header; its domain is also the Message-ID's right-hand side."""
    NOTIFY_RETURN_PATH: str = "bounces@surge.localhost"
    """The envelope sender (MAIL FROM): where relays send RFC 3464 bounce reports."""
    NOTIFY_PUBLIC_URL: str = "http://127.0.0.1:8000"
    """Base URL of the API as recipients reach it (unsubscribe links)."""
    NOTIFY_LOCALE: str = "en"
    """Locale of a message when the caller gives none (a template per locale, `en` fallback)."""
    NOTIFY_RETRY_SCHEDULE: Annotated[list[timedelta], NoDecode] = Field(
        default_factory=lambda: [timedelta(minutes=m) for m in (5, 10, 20, 30)]
    )
    """Delays before the 2nd, 3rd... attempt after a transient failure; the last one repeats
    (Postfix: retry at least every 30 min). Comma-separated seconds in the environment."""
    NOTIFY_MAX_AGE: timedelta = timedelta(days=5)
    """A message still failing transiently this long after it was queued fails for good
    (Postfix maximal_queue_lifetime)."""
    NOTIFY_HARD_BOUNCE_LIMIT: int = 1
    """Hard bounces (5.x.x "no such user") that suppress an address (SES: 1; Postal: 2)."""
    NOTIFY_SOFT_BOUNCE_LIMIT: int = 18
    """Soft bounces (4.x.x replies to the address) within NOTIFY_SOFT_BOUNCE_WINDOW that
    suppress it (Postal: 18)."""
    NOTIFY_SOFT_BOUNCE_WINDOW: timedelta = timedelta(days=7)
    """The window in which soft bounces are counted."""
    NOTIFY_SOFT_SUPPRESSION_TTL: timedelta = timedelta(days=30)
    """How long repeated soft bounces suppress an address (Postal: 30 days); hard bounces
    and complaints suppress until an admin lifts them."""
    NOTIFY_WEBHOOK_SECRET: SecretStr = SecretStr("")
    """HMAC-SHA256 key of `POST /api/v1/webhooks/email`; empty = derived from SECRET_KEY."""
    NOTIFY_WEBHOOK_TOLERANCE: timedelta = timedelta(minutes=5)
    """A signed webhook older (or newer) than this is refused (replay window)."""
    NOTIFY_BOUNCE_RATE_ALERT: float = 0.05
    """Alert when bounces / sent over the last day exceed this (SES review threshold: 5 %)."""
    NOTIFY_COMPLAINT_RATE_ALERT: float = 0.001
    """Alert when complaints / sent over the last day exceed this (SES: 0.1 %)."""
    NOTIFY_RATE_WINDOW: timedelta = timedelta(days=1)
    """The window bounce and complaint rates are computed over."""
    NOTIFY_RATE_MIN_SENT: int = 100
    """No rate alert below this many e-mails sent in the window (1 bounce of 3 is noise)."""
    NOTIFY_SENDING_MARK_FLUSH: bool = False
    """Wait for PostgreSQL's WAL flush when marking a message "sending" (just before the end
    of DATA). Off: the mark survives any worker crash, but a *PostgreSQL* crash in the next
    ~0.6 s (3 × wal_writer_delay) may forget it and resend that message once; it keeps a
    disk flush out of every SMTP conversation (3-4× the throughput; ADR 0019)."""
    NOTIFY_SECURITY_CATEGORIES: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["security"]
    )
    """Categories no preference can turn off (sign-in from a new device, password reset)."""

    @field_validator("NOTIFY_SECURITY_CATEGORIES", mode="before")
    @classmethod
    def _notify_split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("NOTIFY_RETRY_SCHEDULE", mode="before")
    @classmethod
    def _notify_schedule(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [timedelta(seconds=float(p)) for p in value.split(",") if p.strip()]
        return value

    # ---- end notifications -----------------------------------------------------------

    @field_validator("DATABASE_URL")
    @classmethod
    def _asyncpg_scheme(cls, value: str) -> str:
        return normalize_database_url(value) if value else value

    @field_validator("DATABASE_REPLICA_URLS")
    @classmethod
    def _asyncpg_schemes(cls, value: list[str]) -> list[str]:
        return [normalize_database_url(url) for url in value]

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.ENV is not Environment.development:
            secret = self.SECRET_KEY.get_secret_value()
            if secret == DEV_SECRET or len(secret) < 32:
                raise ValueError(
                    f"SURGE_SECRET_KEY must be set to a random value of at least 32 characters "
                    f"when SURGE_ENV={self.ENV.value}"
                )
        if self.DB_POOL_MIN > self.DB_POOL_MAX:
            raise ValueError("SURGE_DB_POOL_MIN cannot exceed SURGE_DB_POOL_MAX")
        return self

    @property
    def is_production(self) -> bool:
        return self.ENV is Environment.production


def normalize_database_url(url: str) -> str:
    """Accept the plain ``postgres://`` / ``postgresql://`` forms and use asyncpg."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


settings = Settings()
