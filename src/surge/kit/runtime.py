"""The per-process composition root of the kit: database, Redis, health, background upkeep.

An API process, a worker process and a test each build one ``Runtime`` from ``Settings``,
``await start()`` it and ``await stop()`` it. Domain code reaches it through FastAPI
dependencies (``surge.kit.web.deps``) or the job context, never through a global.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from surge.config import Settings
from surge.kit.breaker import start_breakers
from surge.kit.cache import Cache, cache_from_settings
from surge.kit.db import Database, PoolConfig
from surge.kit.db.replicas import RedisSticks
from surge.kit.health import Health
from surge.kit.redis import RedisGateway
from surge.kit.telemetry import metrics
from surge.kit.telemetry.alerts import evaluator_from_settings

log = structlog.get_logger()


class ConfigurationError(RuntimeError):
    pass


def pool_config(settings: Settings, application_name: str = "surge") -> PoolConfig:
    return PoolConfig(
        max_size=settings.DB_POOL_MAX,
        min_size=settings.DB_POOL_MIN,
        idle_timeout=settings.DB_POOL_IDLE_TIMEOUT.total_seconds(),
        checkout_timeout=settings.DB_POOL_TIMEOUT.total_seconds(),
        connect_timeout=settings.DB_CONNECT_TIMEOUT.total_seconds(),
        statement_timeout=settings.DB_STATEMENT_TIMEOUT.total_seconds(),
        slow_query=settings.DB_SLOW_QUERY.total_seconds(),
        pgbouncer=settings.DB_PGBOUNCER,
        replica_retry=settings.DB_REPLICA_RETRY.total_seconds(),
        sticky_reads=settings.DB_STICKY_READS.total_seconds(),
        replica_max_lag=settings.DB_REPLICA_MAX_LAG,
        replica_poll=settings.DB_REPLICA_POLL.total_seconds(),
        application_name=application_name,
    )


def redis_gateway(settings: Settings) -> RedisGateway:
    return RedisGateway(
        settings.REDIS_URL,
        socket_timeout=settings.REDIS_SOCKET_TIMEOUT.total_seconds(),
        connect_timeout=settings.REDIS_CONNECT_TIMEOUT.total_seconds(),
        backoff_step=settings.REDIS_BACKOFF_STEP.total_seconds(),
        backoff_max=settings.REDIS_BACKOFF_MAX.total_seconds(),
        max_attempts=settings.REDIS_MAX_RECONNECT_ATTEMPTS,
        max_connections=settings.REDIS_MAX_CONNECTIONS,
        sentinels=settings.REDIS_SENTINELS,
        sentinel_master=settings.REDIS_SENTINEL_MASTER,
    )


class Runtime:
    def __init__(self, settings: Settings, *, application_name: str = "surge") -> None:
        if not settings.DATABASE_URL or not settings.REDIS_URL:
            raise ConfigurationError(
                "DATABASE_URL and REDIS_URL are empty: start Surge with `surge up`/`surge serve` "
                "(which start embedded servers) or set both URLs."
            )
        self.settings = settings
        self.db = Database(
            settings.DATABASE_URL,
            settings.DATABASE_REPLICA_URLS,
            pool_config(settings, application_name),
        )
        self.redis = redis_gateway(settings)
        self.db.sticks = RedisSticks(self.redis)  # read-your-writes seen by every node
        #: The process's tiered cache (L1 → Redis → loader); see ``surge.kit.cache``.
        self.cache: Cache = cache_from_settings(settings, self.redis)
        self.health = Health(timeout=settings.HEALTH_CHECK_TIMEOUT.total_seconds())
        self.health.register("database", self.db.ping)
        self.health.register("redis", self.redis.ping)
        #: Extensions (cache, limiter, job queue...) keyed by name, stopped in reverse order.
        self.extensions: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.db.start()
        if not await self.redis.ping(timeout=self.settings.REDIS_CONNECT_TIMEOUT.total_seconds()):
            log.warning("redis.unavailable_at_start")
            self.redis.mark_down(ConnectionError("unreachable at start-up"))
        await self.cache.start()
        self._tasks.append(asyncio.create_task(self._sample_forever(), name="process-sampler"))
        # Breakers open fleet-wide through Redis; alerts run only with a webhook configured.
        if (fleet := await start_breakers(self.settings, self.redis)) is not None:
            self.extensions["breakers"] = fleet
        if (alerts := evaluator_from_settings(self.settings, self.redis)) is not None:
            alerts.start()
            self.extensions["alerts"] = alerts

    async def _sample_forever(self) -> None:
        tick = 0
        while True:
            metrics.flush_all()  # batched request/breaker metrics, at most 1 s behind
            if tick % 5 == 0:
                metrics.sample_process()
            tick += 1
            await asyncio.sleep(1)

    async def stop(self) -> None:
        for name in reversed(list(self.extensions)):
            closer = getattr(self.extensions[name], "close", None)
            if closer is not None:
                try:
                    await closer()
                except Exception:
                    log.exception("runtime.extension_close_failed", extension=name)
        await self.cache.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.redis.close()
        await self.db.close()
