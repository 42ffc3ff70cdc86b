"""config.CsvList: the one comma-separated list type of the settings."""

from __future__ import annotations

import pytest

from surge.config import Settings


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("SURGE_JOBS_QUEUES", "JOBS_QUEUES"),
        ("SURGE_JOBS_MODULES", "JOBS_MODULES"),
        ("SURGE_TRUSTED_PROXIES", "TRUSTED_PROXIES"),
        ("SURGE_RATELIMIT_EXEMPT_PATHS", "RATELIMIT_EXEMPT_PATHS"),
    ],
)
def test_every_list_setting_reads_comma_separated_values(
    monkeypatch: pytest.MonkeyPatch, variable: str, field: str
) -> None:
    monkeypatch.setenv(variable, " a, b,,c ")
    assert getattr(Settings(), field) == ["a", "b", "c"]


def test_a_list_given_in_code_passes_as_it_is() -> None:
    assert Settings(JOBS_QUEUES=["x, y"]).JOBS_QUEUES == ["x, y"]


def test_secrets_and_replica_urls_are_split_then_converted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SURGE_PAYMENTS_WEBHOOK_SECRETS", "new,old")
    monkeypatch.setenv("DATABASE_REPLICA_URLS", "postgresql://u@r1/d, postgresql://u@r2/d")
    settings = Settings()
    assert [s.get_secret_value() for s in settings.PAYMENTS_WEBHOOK_SECRETS] == ["new", "old"]
    assert settings.DATABASE_REPLICA_URLS == [
        "postgresql+asyncpg://u@r1/d",
        "postgresql+asyncpg://u@r2/d",
    ]
