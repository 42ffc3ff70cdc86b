"""The worker entry: registers every domain's jobs, then runs one worker process.

``discover()`` imports ``surge.<domain>.jobs`` for every domain package that has one (a new
domain is picked up by adding the module, no list to edit) plus ``JOBS_MODULES``. The API
process calls it too, so ``enqueue`` knows each job's queue and options.

``python -m surge.worker --concurrency 8 --queues a,b`` is one process; ``surge worker
--processes N`` supervises N of them (``surge.kit.jobs.fleet``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import pkgutil

import surge
from surge.config import Settings
from surge.config import settings as default_settings
from surge.kit.jobs import load_modules, registered
from surge.kit.jobs.worker import serve
from surge.kit.telemetry.logging import configure_logging

#: Packages under ``surge`` that are not domains (never scanned for jobs).
NOT_DOMAINS = {"kit", "models", "sim", "api", "demo"}


def domain_job_modules() -> list[str]:
    """``surge.<domain>.jobs`` for every domain package that defines one."""
    found = []
    for module in pkgutil.iter_modules(surge.__path__):
        if not module.ispkg or module.name in NOT_DOMAINS:
            continue
        name = f"surge.{module.name}.jobs"
        if importlib.util.find_spec(name) is not None:
            found.append(name)
    return sorted(found)


def discover(settings: Settings | None = None) -> list[str]:
    """Import every module that registers jobs; returns their names."""
    settings = settings or default_settings
    return load_modules([*domain_job_modules(), *settings.JOBS_MODULES])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m surge.worker")
    parser.add_argument("--concurrency", type=int, default=0)
    parser.add_argument("--queues", default="")
    args = parser.parse_args(argv)
    settings = default_settings
    configure_logging(settings.LOG_LEVEL, settings.LOG_JSON)
    discover(settings)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] or None
    import uvloop  # ships with uvicorn[standard]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings, queues=queues, concurrency=args.concurrency or None))


__all__ = ["discover", "domain_job_modules", "main", "registered"]

if __name__ == "__main__":
    main()
