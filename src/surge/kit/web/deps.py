"""FastAPI dependencies that hand the kit's resources to route handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from surge.kit.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def request_id(request: Request) -> str | None:
    """The request's id (set by the middleware; ``X-Request-ID``), for audit rows."""
    return getattr(request.state, "request_id", None)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's unit of work on the primary, committed when the handler returns.

    Used with ``scope="function"``: FastAPI (0.165) otherwise runs a yield dependency's exit
    code *after* the response is sent, so a commit that fails (a deferred constraint, a lost
    connection) would reach the client as a 2xx. With it, the commit happens before the
    response and a failure is a 5xx (tests/kit/test_db.py proves both ways)."""
    async with get_runtime(request).db.session() as session:
        yield session


async def get_read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A read-only session, on a replica when one is configured and healthy."""
    async with get_runtime(request).db.read_session() as session:
        yield session


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session, scope="function")]
