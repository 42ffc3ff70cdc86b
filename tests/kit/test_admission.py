"""Admission control (``kit.web.admission``, ADR 0016) on a real uvicorn server: it sheds
what cannot be served in time with 503 problem+json + ``Retry-After``, and stays out of the
way below its limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI

from surge.config import Settings
from surge.kit.web.admission import SHED, Admission, request_age
from tests.fixtures.payments import serve_app


class Held:
    """A handler that stays in flight until released, and says when ``n`` are inside."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.inside = 0
        self.all_inside = asyncio.Event()
        self.release = asyncio.Event()


def build(held: Held, *, max_in_flight: int, patience: float) -> FastAPI:
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        held.inside += 1
        if held.inside >= held.n:
            held.all_inside.set()
        await held.release.wait()
        return {"ok": True}

    @app.get("/fast")
    async def fast() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/readyz")
    async def readyz() -> dict[str, bool]:
        return {"ready": True}

    app.add_middleware(Admission, max_in_flight=max_in_flight, patience=patience, retry_after=2)
    return app


def shed(reason: str) -> float:
    value = SHED.labels(reason)._value.get()
    assert isinstance(value, float)
    return value


@pytest.fixture
async def held_server() -> AsyncIterator[tuple[Held, str]]:
    held = Held(2)
    async with serve_app(build(held, max_in_flight=2, patience=1.0)) as url:
        yield held, url
        held.release.set()


async def test_sheds_past_the_limit_and_recovers(held_server: tuple[Held, str]) -> None:
    held, url = held_server
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        busy_before = shed("busy")
        slow = [asyncio.create_task(client.get("/slow")) for _ in range(2)]
        await asyncio.wait_for(held.all_inside.wait(), 10)

        refused = await client.get("/fast")
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "2"
        body = refused.json()
        assert body["status"] == 503
        assert body["type"].endswith("overloaded/busy")
        assert shed("busy") == busy_before + 1
        # Probes pass whatever the load: a busy process is alive and ready.
        assert (await client.get("/readyz")).status_code == 200

        held.release.set()
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        # Below the limit again: out of the way.
        answers = await asyncio.gather(*(client.get("/fast") for _ in range(2)))
        assert [r.status_code for r in answers] == [200, 200]
        assert shed("busy") == busy_before + 1


async def test_sheds_requests_older_than_the_patience(held_server: tuple[Held, str]) -> None:
    _, url = held_server
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        before = shed("too_old")
        now = time.time()
        for fresh in (f"t={int(now * 1e6)}", f"{now - 0.2:.3f}", f"t={int((now + 5) * 1000)}"):
            answer = await client.get("/fast", headers={"X-Request-Start": fresh})
            assert answer.status_code == 200, fresh
        assert (await client.get("/fast")).status_code == 200  # no header: no age check
        old = await client.get("/fast", headers={"X-Request-Start": f"t={int((now - 3) * 1e6)}"})
        assert old.status_code == 503
        assert old.headers["retry-after"] == "2"
        assert old.json()["type"].endswith("overloaded/too_old")
        assert shed("too_old") == before + 1
        ready = await client.get("/readyz", headers={"X-Request-Start": f"{now - 60:.3f}"})
        assert ready.status_code == 200


def test_request_age_reads_every_unit() -> None:
    now = 1_800_000_000.0
    for value in (b"t=1799999998.5", b"1799999998500", b"t=1799999998500000"):
        assert request_age([(b"x-request-start", value)], now) == pytest.approx(1.5)
    assert request_age([(b"x-request-start", b"t=soon")], now) is None
    assert request_age([], now) is None
    assert request_age([(b"x-request-start", b"1800000009")], now) == 0.0


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"HTTP_QUEUE_PATIENCE": timedelta(seconds=1)})


async def test_surge_app_sheds_at_the_door(api: httpx.AsyncClient) -> None:
    """The assembled app has the layer outermost: an old request is refused before
    authentication or routing (a 503, not the 401 the route gives without a token)."""
    stamp = f"t={int((time.time() - 5) * 1e6)}"
    old = await api.get("/api/v1/me", headers={"X-Request-Start": stamp})
    assert old.status_code == 503
    assert old.headers["retry-after"] == "1"
    assert old.json()["type"].endswith("overloaded/too_old")
    fresh = await api.get("/api/v1/me", headers={"X-Request-Start": f"{time.time():.3f}"})
    assert fresh.status_code == 401
