"""The settings' own types: the comma-separated list, the environment, database URLs."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

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


def normalize_database_url(url: str) -> str:
    """Accept the plain ``postgres://`` / ``postgresql://`` forms and use asyncpg."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url
