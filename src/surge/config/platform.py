"""Settings of the platform: the environment and secret key, the servers, the database pool, Redis, the web server, health,
metrics, and the capacity tuning of the HTTP server (issue: capacity)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings

from surge.config._types import DEV_SECRET, CsvList, Environment, normalize_database_url


class PlatformSettings(BaseSettings):
    """Servers, pools, web, health, metrics (a section of ``surge.config.Settings``)."""

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
    GC_THRESHOLDS: tuple[int, ...] = (50_000, 20, 100)
    """``gc.set_threshold`` of a web process once it has started (ADR 0041); ``[]`` keeps
    Python's (700, 10, 10). With Python's, a web process under seed 003's load ran a young
    collection every ~20 ms and a full one (a walk over every cached entry: 160-460 ms, the
    event loop stopped) every 2-3 s: 12-22 % of its CPU. Young collections every 50 000 net
    allocations, an old one every 20 of those, a full one at most every 100 old ones (and
    only when a quarter of the old objects are new: Python's own rule)."""
    HTTP_SERVER_TIMING: bool = True
    """Send ``Server-Timing: queue;dur=…, app;dur=…`` on every response (where the time went;
    ``surge load`` reads it). Turn off to hide server timings from clients."""
    # -- issue 19, capacity II (ADR 0016): admission control, /me cache ------------------
    HTTP_MAX_IN_FLIGHT: int = 256
    """Requests one web process serves at once; more are refused at the door with 503 +
    ``Retry-After`` (``kit.web.admission``) instead of queueing behind the event loop and the
    database pool. 0 turns the bound off. Health, readiness and /metrics are exempt."""
    HTTP_QUEUE_PATIENCE: timedelta = timedelta(seconds=2)
    """A request whose ``X-Request-Start`` (set by the proxy or client) is older than this
    when it reaches the app is refused with 503 + ``Retry-After``: its client has most likely
    given up, and serving it would make the next ones late too. 0 turns it off. Needs clocks
    in sync (NTP) between the proxy and the web hosts."""
    HTTP_SHED_RETRY_AFTER: int = 1
    """``Retry-After`` seconds on a request shed by admission control."""
    IDENTITY_USER_L1_SIZE: int = 50_000
    """``GET /me``: user rows kept in each process's memory (LRU), above the active
    population like ``IDENTITY_PRIVILEGE_L1_SIZE``."""
    IDENTITY_USER_TTL: timedelta = timedelta(minutes=10)
    """``GET /me``: how long a user row is kept in Redis. Every write to a field ``/me``
    shows invalidates it in every tier and process at commit; the TTL only bounds memory."""

    @field_validator("DATABASE_URL")
    @classmethod
    def _asyncpg_scheme(cls, value: str) -> str:
        return normalize_database_url(value) if value else value

    @field_validator("DATABASE_REPLICA_URLS")
    @classmethod
    def _asyncpg_schemes(cls, value: list[str]) -> list[str]:
        return [normalize_database_url(url) for url in value]
