"""Identity fixtures: the app with cheap Argon2 parameters (``app_settings``); the helpers to
create users and sign in live in ``tests/fixtures/factories.py``."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from surge.config import Settings
from tests.fixtures.factories import (
    FAST_ARGON2,
    PASSWORD,
    bearer,
    identity_of,
    identity_settings,
    login,
    make_admin,
    register,
    unique_email,
)

# Re-exported for tests written before the fixtures package: import from tests.fixtures.
__all__ = [
    "FAST_ARGON2",
    "PASSWORD",
    "bearer",
    "identity_of",
    "identity_settings",
    "login",
    "make_admin",
    "register",
    "unique_email",
]


@pytest.fixture(scope="session")
def id_settings(server_urls: tuple[str, str]) -> Settings:
    return identity_settings(*server_urls)


@pytest.fixture
def app_settings(id_settings: Settings) -> Settings:
    return id_settings


@pytest.fixture
def id_app(app: FastAPI) -> FastAPI:
    return app
