"""The operator's console at ``/admin`` (issue 16): sign-in with MFA enrolment, live charts,
jobs, withdrawals, operations in review, service API keys, breakers, caches, users, audit
log and alerts; every action confirmed and audited. ``install_console(app, runtime)`` mounts it and runs its metrics sampler."""

from __future__ import annotations

from fastapi import FastAPI

from surge.admin.console.routes import console_error
from surge.admin.console.routes import router as console_router
from surge.admin.console.session import ConsoleError
from surge.admin.console.timeseries import run_sampler_with
from surge.kit.runtime import Runtime


def install_console(app: FastAPI, runtime: Runtime) -> None:
    app.include_router(console_router)
    app.add_exception_handler(ConsoleError, console_error)
    run_sampler_with(app, runtime)


__all__ = ["install_console"]
