"""The no-op job of ``surge bench jobs`` (imported by Surge worker processes)."""

from __future__ import annotations

from surge.kit.jobs import JobContext, job


@job("bench.noop", queue="bench")
async def noop(ctx: JobContext) -> None:
    return None
