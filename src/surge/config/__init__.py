"""Surge's configuration: one Settings class, one ``settings``.

Every variable is read with the ``SURGE_`` prefix (``SURGE_DB_POOL_MAX``) from the
environment or ``.env``. The three server URLs are also accepted without the prefix
(``DATABASE_URL``, ``DATABASE_REPLICA_URLS``, ``REDIS_URL``) because every PaaS sets them so.
When a URL is empty, Surge starts its own server from pip packages (see ``surge.kit.embedded``).

``Settings`` is assembled from one section class per area, each a module of this package:
``platform`` (servers, pools, web, health, metrics), ``kit`` (cache, rate limits, jobs,
breakers, outbound HTTP, alerts) and ``domains`` (a block per domain). A new setting goes
into the section it belongs to; the variable name does not depend on where it is declared.
"""

from __future__ import annotations

from pydantic import model_validator
from pydantic_settings import SettingsConfigDict

from surge.config._types import (
    DEV_SECRET,
    CsvList,
    Environment,
    normalize_database_url,
    split_csv,
)
from surge.config.domains import DomainSettings
from surge.config.kit import KitSettings
from surge.config.platform import PlatformSettings

__all__ = [
    "DEV_SECRET",
    "CsvList",
    "Environment",
    "Settings",
    "normalize_database_url",
    "settings",
    "split_csv",
]


class Settings(DomainSettings, KitSettings, PlatformSettings):
    """All of Surge's settings. Durations are ``timedelta`` (``30``, ``"PT30S"`` or ``"00:00:30"``).

    The last base's fields come first (``surge doctor`` lists them in that order)."""

    model_config = SettingsConfigDict(
        env_prefix="SURGE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

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


settings = Settings()
