"""Job registration: ``@job("domain.action", queue=..., ...)`` and the process-wide registry.

A handler is ``async def handler(ctx: JobContext) -> None``. Registering is a side effect of
importing the module that defines it; ``load_modules`` imports a list of modules by name so
the API process (which enqueues) and the worker process (which runs) agree on every job's
queue and options without the kit importing any domain.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from surge.kit.jobs.cron import Cron

if TYPE_CHECKING:
    from surge.kit.jobs.context import JobContext

Handler = Callable[["JobContext"], Awaitable[None]]

DEFAULT_QUEUE = "default"


class JobRegistryError(ValueError):
    """A registration is invalid (duplicate name, bad cron...)."""


@dataclass(frozen=True)
class JobSpec:
    """Everything the queue knows about one job name. ``None`` options use the settings."""

    name: str
    handler: Handler
    queue: str = DEFAULT_QUEUE
    max_attempts: int | None = None
    max_stalled: int | None = None
    backoff: timedelta | None = None
    """First retry delay; doubled per attempt up to ``backoff_max`` (with jitter)."""
    backoff_max: timedelta | None = None
    timeout: timedelta | None = None
    """The handler is cancelled (and the attempt fails) after this long."""
    priority: int = 0
    cron: Cron | None = None
    """Periodic: one job enqueued per cron slot, by exactly one worker."""

    def next_run(self, after: datetime) -> datetime | None:
        return self.cron.next_after(after) if self.cron else None


_REGISTRY: dict[str, JobSpec] = {}


def job(
    name: str,
    *,
    queue: str = DEFAULT_QUEUE,
    max_attempts: int | None = None,
    max_stalled: int | None = None,
    backoff: timedelta | None = None,
    backoff_max: timedelta | None = None,
    timeout: timedelta | None = None,
    priority: int = 0,
    cron: str | None = None,
) -> Callable[[Handler], Handler]:
    """Register ``handler`` under the dotted ``name`` (``"billing.invoice.issue"``)."""
    if not name or name != name.strip():
        raise JobRegistryError(f"invalid job name {name!r}")

    def decorate(handler: Handler) -> Handler:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.handler is not handler:
            same = (existing.handler.__module__, existing.handler.__qualname__) == (
                handler.__module__,
                handler.__qualname__,
            )
            if not same:  # a module imported twice re-registers itself: harmless
                raise JobRegistryError(f"job {name!r} is already registered")
        _REGISTRY[name] = JobSpec(
            name=name,
            handler=handler,
            queue=queue,
            max_attempts=max_attempts,
            max_stalled=max_stalled,
            backoff=backoff,
            backoff_max=backoff_max,
            timeout=timeout,
            priority=priority,
            cron=Cron.parse(cron) if cron else None,
        )
        return handler

    return decorate


def get_spec(name: str) -> JobSpec | None:
    return _REGISTRY.get(name)


def registered() -> dict[str, JobSpec]:
    """A copy of the registry (name → spec)."""
    return dict(_REGISTRY)


def unregister(name: str) -> None:
    """Remove ``name`` (tests)."""
    _REGISTRY.pop(name, None)


def load_modules(modules: Iterable[str]) -> list[str]:
    """Import each module by name (each registers its jobs); returns those imported."""
    loaded = []
    for module in modules:
        if module:
            importlib.import_module(module)
            loaded.append(module)
    return loaded


def queues_of(specs: Iterable[JobSpec]) -> list[str]:
    return sorted({spec.queue for spec in specs} | {DEFAULT_QUEUE})


def describe(spec: JobSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "queue": spec.queue,
        "max_attempts": spec.max_attempts,
        "cron": spec.cron.expression if spec.cron else None,
    }
