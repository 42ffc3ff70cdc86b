"""structlog set up once per process: JSON lines in production, console when interactive.

A request's or a job's correlation id is bound in contextvars (``bind_contextvars``) so every
line logged while serving it carries ``request_id``. Standard-library loggers (uvicorn,
alembic, asyncio) are routed through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

#: Never log these values, whatever the caller passes.
REDACTED_KEYS = frozenset(
    {"password", "token", "access_token", "refresh_token", "secret", "authorization", "card"}
)


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in event.keys() & REDACTED_KEYS:
        event[key] = "***"
    return event


def _orjson_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Not cached: structlog.testing.capture_logs must see every logger, and no log
        # call sits on a per-request hot path (access logs are off by default).
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # SQLAlchemy's pool chatters at INFO ("Pool disposed", "Pool recreating") on every stop.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
