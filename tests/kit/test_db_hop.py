"""kit.db.hop: ``greenlet_spawn`` on a reused greenlet (ADR 0057) — same protocol: values,
errors, ``await_``, cancellation and contextvars pass as through SQLAlchemy's own."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from greenlet import getcurrent  # type: ignore[import-untyped]
from sqlalchemy.util import await_

from surge.kit.db.hop import hop

_REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="-")


def _where() -> Any:
    return getcurrent()


class TestHop:
    async def test_runs_in_a_sqlalchemy_greenlet_kept_for_the_next_call(self) -> None:
        first = await hop(_where)
        second = await hop(_where)
        assert first is second  # reused, not a new greenlet per call
        assert first is not getcurrent()
        assert first.__sqlalchemy_greenlet_provider__

    async def test_await_inside_hands_the_awaitable_back(self) -> None:
        async def later(value: int) -> int:
            await asyncio.sleep(0)
            return value * 2

        def sync_code(value: int) -> int:
            return await_(later(value)) + await_(later(1))

        assert await hop(sync_code, 20) == 42

    async def test_an_error_reaches_the_caller_and_the_greenlet_serves_again(self) -> None:
        async def refuse() -> None:
            raise LookupError("refused")

        def sync_code() -> None:
            await_(refuse())

        with pytest.raises(LookupError, match="refused"):
            await hop(sync_code)
        assert await hop(lambda: 7) == 7

    async def test_cancellation_is_thrown_into_the_sync_code(self) -> None:
        waiting = asyncio.Event()
        cleaned: list[str] = []

        async def forever() -> None:
            waiting.set()
            await asyncio.Event().wait()

        def sync_code() -> None:
            try:
                await_(forever())
            finally:
                cleaned.append("finally ran")

        task = asyncio.create_task(hop(sync_code))
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == ["finally ran"]
        assert await hop(lambda: "usable") == "usable"

    async def test_concurrent_calls_each_get_their_own_greenlet(self) -> None:
        gate = asyncio.Event()

        async def wait_gate() -> None:
            await gate.wait()

        def sync_code(tag: str) -> tuple[str, Any]:
            await_(wait_gate())
            return tag, getcurrent()

        calls = [asyncio.create_task(hop(sync_code, tag)) for tag in ("a", "b")]
        await asyncio.sleep(0)
        gate.set()
        (a, ga), (b, gb) = await asyncio.gather(*calls)
        assert (a, b) == ("a", "b")
        assert ga is not gb

    async def test_the_callers_contextvars_are_seen_inside(self) -> None:
        _REQUEST.set("r-1")
        assert await hop(_REQUEST.get) == "r-1"
        _REQUEST.set("r-2")
        assert await hop(_REQUEST.get) == "r-2"
