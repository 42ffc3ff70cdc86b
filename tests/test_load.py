"""``surge load``'s generator: open loop without coordinated omission, figures, Server-Timing.

The server here is a few lines of asyncio that answer ``/livez`` after a delay the test
sets, so the test knows exactly what latency users must see: when the server stalls, the
requests due meanwhile must still be sent on schedule (as soon as their connection is free)
and their latency counted from when they were due, not from when the generator got round to
sending them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from bench.load.client import Connection, build_request, parse_server_timing
from bench.load.engine import OpenPlan, Records, _open_main
from bench.load.runner import summarize
from bench.load.scenario import User
from fastapi import FastAPI


class SlowServer:
    """HTTP/1.1 keep-alive server answering every request after ``delay`` seconds."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
                body = b'{"status":"ok"}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Request-ID: r%d\r\n"
                    b"Server-Timing: queue;dur=0.50, app;dur=%.2f\r\n\r\n%s"
                    % (len(body), self.requests, self.delay * 1000, body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> SlowServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def slow_server() -> AsyncIterator[SlowServer]:
    async with SlowServer() as server:
        yield server


def plan(
    port: int, *, users: int, think: float, duration: float, timeout: float = 60.0
) -> OpenPlan:
    return OpenPlan(
        host="127.0.0.1", port=port, scenario="ping", users=[User(str(i)) for i in range(users)],
        population=[], service_token=None, think=think, ramp=0.0, duration=duration,
        start_epoch=time.time() + 0.2, seed=1, timeout=timeout,
    )  # fmt: skip


async def test_keep_alive_client_reads_status_headers_and_body(slow_server: SlowServer) -> None:
    connection = Connection("127.0.0.1", slow_server.port, keep_body=True)
    raw = build_request("GET", "/livez", "127.0.0.1")
    first = await connection.request(raw)
    second = await connection.request(raw)
    assert (first.status, first.request_id, first.body) == (200, "r1", b'{"status":"ok"}')
    assert second.request_id == "r2"
    assert connection.connects == 1  # one keep-alive connection for both
    assert parse_server_timing(first.server_timing) == {"queue": 0.5, "app": 0.0}
    connection.close()


async def test_open_loop_counts_a_stall_from_the_intended_start(slow_server: SlowServer) -> None:
    # One user, a request due every ~20 ms on average, for 1.5 s: ~75 due. The server takes
    # 300 ms per answer, so the user falls behind; a closed loop would send ~5 requests and
    # report 300 ms. The open loop must record every due request and latencies that grow
    # with the backlog (from the due time), far above the 300 ms the server reports.
    slow_server.delay = 0.3
    records: Records = await _open_main(plan(slow_server.port, users=1, think=0.02, duration=1.5))
    due = len(records.due)
    summary = summarize(records, ["livez"], steady_from=0.0, steady_to=1.5)
    assert due >= 40  # every due request was made, however late
    assert slow_server.requests == due
    assert summary["latency"]["p50_ms"] > 1000  # waiting its turn counts
    assert summary["where"]["server_app"]["p50_ms"] == pytest.approx(300, rel=0.05)
    assert summary["where"]["client_wait_before_send"]["p99_ms"] > 1000
    assert summary["served_rps"] < summary["offered_rps"] / 3  # served fell behind offered


async def test_requests_older_than_the_timeout_fail_unsent_and_the_run_ends(
    slow_server: SlowServer,
) -> None:
    # The same stall with users who give up after 0.5 s: the run ends about on time, the
    # backlog becomes recorded timeouts (errors), and nothing is silently dropped.
    slow_server.delay = 0.3
    started = time.monotonic()
    records = await _open_main(
        plan(slow_server.port, users=1, think=0.02, duration=1.5, timeout=0.5)
    )
    assert time.monotonic() - started < 4
    summary = summarize(records, ["livez"], steady_from=0.0, steady_to=1.5)
    assert summary["errors"] >= summary["requests"] // 2
    assert summary["statuses"]["no answer"] == summary["errors"]
    assert any("before it could be sent" in kind for kind in records.errors)
    assert slow_server.requests < summary["requests"]


async def test_open_loop_keeps_the_rate_of_a_fast_server(slow_server: SlowServer) -> None:
    records = await _open_main(plan(slow_server.port, users=50, think=0.25, duration=2.0))
    summary = summarize(records, ["livez"], steady_from=0.0, steady_to=2.0)
    # 50 users / 0.25 s = 200/s offered: Poisson arrivals, so within ±25 % over 2 s.
    assert 150 <= summary["offered_rps"] <= 250
    assert summary["errors"] == 0
    assert summary["latency"]["p50_ms"] < 50
    assert records.connects == 50  # one keep-alive connection per user, never reopened


async def test_closed_loop_in_two_processes_rotates_tokens(slow_server: SlowServer) -> None:
    # What surge bench ping/privileges run (wrk's model): 2 processes, 4 connections.
    from bench.load.runner import closed

    result = await asyncio.to_thread(
        closed, "127.0.0.1", slow_server.port, "/livez", 1.0,
        connections=4, processes=2, tokens=["a", "b", "c"],
    )  # fmt: skip
    assert result["errors"] == 0
    assert result["rps"] > 50
    assert slow_server.requests >= result["rps"] * 0.9
    assert 0 < result["p50_ms"] <= result["p99_ms"]


async def test_server_timing_reports_queue_and_app_time(app: FastAPI) -> None:
    from tests.fixtures.clients import app_client

    stamp = int((time.time() - 0.25) * 1e6)  # sent 250 ms ago by the client's clock
    async for client in app_client(app):
        response: httpx.Response = await client.get(
            "/livez", headers={"X-Request-Start": f"t={stamp}"}
        )
        timing = parse_server_timing(response.headers["server-timing"])
        assert 250 <= timing["queue"] < 5000
        assert 0 <= timing["app"] < 1000
        plain = await client.get("/livez")
        assert set(parse_server_timing(plain.headers["server-timing"])) == {"app"}
        await asyncio.sleep(0)
