"""``seed003_writes``'s "stale after write" check: only what a cache served after a confirmed
plan change is stale.

The server is a loopback HTTP/1.1 server holding each user's plan in a dict, with no cache
at all, so it can never serve a stale plan: whatever the generator counts as stale against it
is the harness's own error. ``refuses`` makes it answer every plan change with a 503 and
change nothing (what admission does past the knee: 2 356 ``write: HTTP 503`` in the run that
reported 974 stale reads); ``forgets`` makes it answer 204 and change nothing, a server that
really is stale, which the check must still catch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from bench.load.engine import OpenPlan, Records, _open_main
from bench.load.scenario import User
from bench.load.scenarios import seed003_writes


class PlanServer:
    def __init__(self) -> None:
        self.plans: dict[str, str] = {}
        self.refuses = False
        self.forgets = False
        self.writes = 0
        #: Writes whose plan differs from the one the server holds (forgetting them is stale).
        self.changes = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                lines = head.split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                user = headers.get("authorization", "").removeprefix("Bearer ")
                if method == "PUT":
                    self.writes += 1
                    target = path.split("/")[-2]
                    if self.refuses:
                        answer = _response(503, b'{"title":"Service Unavailable"}')
                    else:
                        wanted = orjson.loads(body)["plan"]
                        self.changes += wanted != self.plans.get(target, "free")
                        if not self.forgets:
                            self.plans[target] = wanted
                        answer = _response(204, b"")
                elif path == "/api/v1/me/privileges":
                    plan = self.plans.get(user, "free")
                    answer = _response(200, orjson.dumps({"plan": plan}))
                else:
                    answer = _response(200, b"{}")
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> PlanServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def _response(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PlanServer]:
    # Every user action is a write (plan change + read back), so each run checks many.
    write = next(s for s in seed003_writes.STEPS if s.name == "write")
    monkeypatch.setattr(seed003_writes, "STEPS", [write])
    async with PlanServer() as plan_server:
        yield plan_server


async def run(server: PlanServer) -> Records:
    # The user's token is its id: the server answers GET /me/privileges for that user.
    users = [User(f"u{i}", token=f"u{i}") for i in range(5)]
    plan = OpenPlan(
        host="127.0.0.1", port=server.port, scenario="seed003_writes", users=users,
        population=users, service_token="admin", think=0.02, ramp=0.0, duration=0.6,
        start_epoch=time.time() + 0.1, seed=3, timeout=5.0,
    )  # fmt: skip
    return await _open_main(plan)


async def test_a_server_without_a_cache_is_never_counted_stale(server: PlanServer) -> None:
    records = await run(server)
    assert server.writes >= 20
    assert records.errors == {}


async def test_a_refused_plan_change_is_an_error_but_its_read_back_is_not_stale(
    server: PlanServer,
) -> None:
    # Before the fix every refused write's follow-up (rightly showing the old plan) was
    # counted "stale after write".
    server.refuses = True
    records = await run(server)
    assert server.writes >= 20
    assert records.errors == {"write: HTTP 503": server.writes}


async def test_a_confirmed_plan_change_read_back_old_is_stale(server: PlanServer) -> None:
    server.forgets = True
    records = await run(server)
    assert server.writes >= 20
    assert server.changes >= 10
    assert records.errors == {"write: stale after write": server.changes}
