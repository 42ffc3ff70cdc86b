"""Settings of the domains: identity, wallet, console, operations, payments, notifications."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode

from surge.config._types import CsvList


class DomainSettings(BaseSettings):
    """Each domain's settings, a block each (a section of ``surge.config.Settings``)."""

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
    # ---- device tokens: the account lock-out is not a denial of service (ADR 0044) ----
    AUTH_LOGIN_MAX_FAILURES_DEVICE: int = 5
    """Failed logins per trusted device (a valid device token for the account) per
    AUTH_LOGIN_WINDOW; past it that device token is locked out (429). A client presenting
    a trusted device token is judged by this budget instead of the account's, so a stolen
    token buys this many guesses and no more."""
    AUTH_DEVICE_TTL: timedelta = timedelta(days=90)
    """How long a device token (issued at each successful sign-in) keeps a client trusted.
    "Log out everywhere" and a password reset revoke every device token of the account."""
    AUTH_MFA_ISSUER: str = "Surge"
    """Issuer shown by authenticator apps for TOTP enrolment."""
    # ---- issue 15: password reset (surge.identity.recovery) ----
    AUTH_PASSWORD_RESET_TTL: timedelta = timedelta(minutes=30)
    """How long a password-reset link works (single use; a newer request supersedes it)."""
    AUTH_PASSWORD_RESET_URL: str = ""
    """The page the reset e-mail links to, ``?token=...`` appended (the front end posts the
    token to ``/api/v1/auth/password/reset``). Empty: ``NOTIFY_PUBLIC_URL`` + ``/reset-password``."""
    AUTH_PASSWORD_RESET_WINDOW: timedelta = timedelta(hours=1)
    """Window over which reset requests are counted, per address and per client IP."""
    AUTH_PASSWORD_RESET_MAX_PER_ADDRESS: int = 3
    """Reset e-mails per address per window; requests past it answer the same 202 and send
    nothing (nobody can flood an inbox, and the answer still says nothing about the address)."""
    AUTH_PASSWORD_RESET_MAX_PER_IP: int = 20
    """Reset requests per client IP (IPv6: per /64) per window; past it: 429."""
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
    IDENTITY_PRIVILEGE_TTL: timedelta = timedelta(hours=1)
    """How long privileges are kept in Redis (jittered, refreshed early when read), and the
    age at which the free users' snapshot is retaken. Seed 003 said 5 minutes; but every
    plan change invalidates every tier at commit, and an invalidation that fails is
    replayed within a second while Redis is up (ADR 0043): the TTL is only the safety net
    for a write made outside the service. At 5 minutes it also expired everything warmed at
    start as one wave and capped batch checks of random users at 83 % hits (ADR 0041, 0050)."""
    IDENTITY_PRIVILEGE_STALE: timedelta = timedelta(hours=1)
    """How long an expired in-memory entry may still be served while PostgreSQL is down."""
    IDENTITY_REFRESH_INTERVAL: timedelta = timedelta(minutes=1)
    """Seed 003: ``REFRESH MATERIALIZED VIEW CONCURRENTLY active_subscriptions`` period;
    a refresh that would change nothing a reader sees is skipped (ADR 0041)."""
    IDENTITY_FREE_SNAPSHOT: bool = True
    """Keep in each process a compact snapshot of the users who never had a subscription
    (16 bytes a user), so "free" is answered from memory without an entry per user; kept
    coherent by the privilege cache's invalidations (ADR 0050)."""
    IDENTITY_WARM_SUBSCRIBED: bool = True
    """At start, write every subscribed user's privileges to Redis in bulk (those already
    there are only read), before the process takes traffic (ADR 0050)."""
    IDENTITY_WARM_USERS: int = 20_000
    """Most recently active users whose privileges and ``/me`` views are loaded into memory
    (and Redis) at start. Above
    the active population (seed 003: 10 000 signed in): at 1 000, a restart under load sent
    every other active user's first request to PostgreSQL at once (issue 19)."""

    # --- wallet --------------------------------------------------------------------------
    WALLET_CURRENCY: str = "USD"
    """ISO 4217 code of partner wallets; every amount is an integer of its minor unit."""
    WALLET_WITHDRAWAL_MIN: int = 1_000
    """Smallest withdrawal, in minor units (1 000 = 10.00)."""
    WALLET_WITHDRAWAL_MAX: int = 1_000_000
    """Largest single withdrawal, in minor units (1 000 000 = 10 000.00)."""
    WALLET_WITHDRAWAL_DAILY_MAX: int = 2_000_000
    """Most one owner may ask to withdraw in any 24 hours, pending and approved requests
    together (2 000 000 = 20 000.00; ADR 0051). Without it the per-request maximum bounded
    nothing: a stolen session drained a wallet in as many requests as it liked."""
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

    # ---- four-eyes: a second administrator for money actions (ADR 0059) -------------
    APPROVAL_THRESHOLD: int = 500_000
    """Above this many minor units (500 000 = 5 000.00), an administrator's money action
    (paying a withdrawal out, a revenue event, releasing an operation's reservation) is
    recorded pending and carried out only when a different administrator approves it.
    A debt write-off always needs the second administrator, whatever its amount."""
    APPROVAL_TERMS_BPS: int = 2_000
    """New partner terms whose effective rate (share × commission, in basis points of the
    event's profit) exceeds this (2 000 = 20 %; the defaults give 4 %) need a second
    administrator: 100 % × 100 % terms would hand a partner the whole profit."""
    APPROVAL_TTL: timedelta = timedelta(hours=24)
    """How long a pending request waits for its second administrator before it expires."""
    APPROVAL_SOLO_BUDGET: int = 2_500_000
    """What one administrator may move alone (each action within ``APPROVAL_THRESHOLD``)
    per currency in any ``APPROVAL_SOLO_WINDOW`` (2 500 000 = 25 000.00): an action that
    would take them past it waits for a second administrator like a large one, so many
    payouts just under the threshold are not one person's word either (ADR 0066)."""
    APPROVAL_SOLO_WINDOW: timedelta = timedelta(hours=24)
    """The rolling window of ``APPROVAL_SOLO_BUDGET``."""

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
    OPERATIONS_FLEET_WAIT: timedelta = timedelta(minutes=30)
    """How long an operation waits, attempts unspent, while every egress proxy is cooling
    down (blocked or failing, re-check not yet due) or every active provider account is
    leased by other jobs: a fleet that is busy or down for now is not the operation's
    failure. Past this (from the operation's creation), such an attempt counts."""
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
    NOTIFY_SEND_BATCH: int = 16
    """Messages one send job handles: it takes up to this many minus one other ready send
    jobs with it (``surge.kit.jobs.batch``), loads their rows in one statement and acks them
    in one, and sends them one after another through the SMTP pool (ADR 0031).
    1: one message per job."""
    NOTIFY_SEND_WAVE: int = 8
    """Messages of one batch sent at the same time, each on its own pooled connection (a
    *wave*, ADR 0040): their marks and their ``sent`` records then meet in a few shared
    statements instead of one each. 1: one after another."""
    NOTIFY_MARK_IN_FLIGHT: int = 1
    """Mark statements (``sending``, just before an end of DATA) one worker process may
    have in flight at once. 2: a mark that arrives while one is on the wire starts the next
    at once instead of waiting for its answer (the compare-and-set keeps two attempts of one
    message in different statements apart); measured no faster on the 2-core bench box, so
    1 (ADR 0026's lane) stays the default (ADR 0055)."""
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
    NOTIFY_SECURITY_CATEGORIES: CsvList[str] = Field(default_factory=lambda: ["security"])
    """Categories no preference can turn off (sign-in from a new device, password reset)."""

    @field_validator("NOTIFY_RETRY_SCHEDULE", mode="before")
    @classmethod
    def _notify_schedule(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [timedelta(seconds=float(p)) for p in value.split(",") if p.strip()]
        return value

    # ---- end notifications -----------------------------------------------------------
