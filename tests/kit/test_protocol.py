"""``surge.kit.web.protocol.OneWriteProtocol`` (ADR 0056): uvicorn's httptools protocol with
each fixed-length response written in one call, and otherwise uvicorn's bytes and behaviour.

The write counts are read from a recording transport fed whole requests, as uvicorn's own
protocol tests do; the last class serves the same app on a real loopback socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from surge.kit.web.protocol import PROTOCOL, OneWriteProtocol
from surge.kit.web.stack import install_stack
from tests.fixtures.payments import serve_app

GET = b"GET /fixed HTTP/1.1\r\nHost: test\r\n\r\n"
BODY = b'{"status":"ok"}'


class Recording:
    """A transport that records what the protocol writes, call by call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.writes.append(b"".join(parts))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """/fixed: a Content-Length response; /stream: chunked, its body only once released;
    /large: a body past the join threshold; /broken: fails after starting its response."""
    path = scope["path"]
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await RELEASE.wait()
        await send({"type": "http.response.body", "body": b"tick", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/echo":
        message: Message = await receive()
        body = message.get("body", b"")
        length = (b"content-length", b"%d" % len(body))
        await send({"type": "http.response.start", "status": 200, "headers": [length]})
        await send({"type": "http.response.body", "body": body})
        return
    body = b"x" * 100_000 if path == "/large" else BODY
    headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if path == "/broken":
        raise RuntimeError("failed after the head")
    await send({"type": "http.response.body", "body": body})


RELEASE = asyncio.Event()


def connect(cls: type[HttpToolsProtocol]) -> tuple[HttpToolsProtocol, Recording]:
    config = Config(app=app, loop="none", http="httptools", lifespan="off", log_config=None)
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    transport = Recording()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


async def settle(transport: Recording, done: Callable[[], bool]) -> None:
    for _ in range(100):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not done after 100 loop iterations: {transport.writes!r}")


async def exchange(cls: type[HttpToolsProtocol], request: bytes, responses: int = 1) -> Recording:
    protocol, transport = connect(cls)
    protocol.data_received(request)
    await settle(transport, lambda: transport.data.count(b"HTTP/1.1 2") >= responses)
    await asyncio.sleep(0)
    return transport


class TestUvicornVersion:
    def test_the_protocol_is_pinned_to_the_uvicorn_it_was_written_against(self) -> None:
        # It overrides HttpToolsProtocol._start_asgi_task and swaps a cycle's transport:
        # read uvicorn's httptools_impl again before moving this pin (ADR 0056).
        assert uvicorn.__version__ == "0.54.0"
        assert f"{OneWriteProtocol.__module__}:{OneWriteProtocol.__name__}" == PROTOCOL


class TestOneWrite:
    async def test_a_fixed_length_response_is_one_write_of_uvicorns_own_bytes(self) -> None:
        ours = await exchange(OneWriteProtocol, GET)
        stock = await exchange(HttpToolsProtocol, GET)
        assert len(stock.writes) == 2
        assert len(ours.writes) == 1
        assert ours.data == stock.data
        assert ours.data.endswith(b"\r\n\r\n" + BODY)

    async def test_a_large_body_is_one_call_with_both_parts(self) -> None:
        request = b"GET /large HTTP/1.1\r\nHost: test\r\n\r\n"
        ours = await exchange(OneWriteProtocol, request)
        stock = await exchange(HttpToolsProtocol, request)
        assert len(ours.writes) == 1
        assert ours.data == stock.data

    async def test_pipelined_requests_are_answered_in_order_one_write_each(self) -> None:
        request = GET + b"GET /large HTTP/1.1\r\nHost: test\r\n\r\n" + GET
        ours = await exchange(OneWriteProtocol, request, responses=3)
        stock = await exchange(HttpToolsProtocol, request, responses=3)
        assert len(ours.writes) == 3
        assert ours.data == stock.data

    async def test_a_closing_connection_gets_its_response_then_closes(self) -> None:
        ours = await exchange(OneWriteProtocol, b"GET /fixed HTTP/1.0\r\n\r\n")
        assert len(ours.writes) == 1
        assert b"connection: close" in ours.writes[0]
        assert ours.closed


class TestNotHeld:
    async def test_a_chunked_head_goes_out_before_its_body_exists(self) -> None:
        RELEASE.clear()
        protocol, transport = connect(OneWriteProtocol)
        protocol.data_received(b"GET /stream HTTP/1.1\r\nHost: test\r\n\r\n")
        await settle(transport, lambda: len(transport.writes) == 1)
        assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"transfer-encoding: chunked" in transport.writes[0]
        RELEASE.set()
        await settle(transport, lambda: transport.data.endswith(b"0\r\n\r\n"))
        assert transport.writes[1:] == [b"4\r\ntick\r\n", b"0\r\n\r\n"]

    async def test_a_head_request_is_answered_and_the_connection_serves_the_next(self) -> None:
        request = b"HEAD /fixed HTTP/1.1\r\nHost: test\r\n\r\n" + GET
        ours = await exchange(OneWriteProtocol, request, responses=2)
        stock = await exchange(HttpToolsProtocol, request, responses=2)
        assert ours.data == stock.data
        assert ours.writes[0].endswith(b"\r\n\r\n")  # the HEAD answer: a head, no body
        assert ours.writes[1].endswith(BODY)

    async def test_100_continue_is_written_before_the_response(self) -> None:
        request = (
            b"POST /echo HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
            b"Content-Length: 2\r\n\r\nhi"
        )
        ours = await exchange(OneWriteProtocol, request)
        assert ours.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert len(ours.writes) == 2
        assert ours.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")
        assert ours.writes[1].endswith(b"\r\n\r\nhi")

    async def test_an_app_failing_after_its_head_sends_the_head_then_closes(self) -> None:
        protocol, transport = connect(OneWriteProtocol)
        protocol.data_received(b"GET /broken HTTP/1.1\r\nHost: test\r\n\r\n")
        await settle(transport, lambda: transport.closed)
        assert len(transport.writes) == 1
        assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert transport.writes[0].endswith(b"\r\n\r\n")  # as uvicorn: the head, then close


class TestOnASocket:
    async def test_surges_stack_answers_through_it_with_every_header(self) -> None:
        api = FastAPI()

        @api.api_route("/fixed", methods=["GET", "HEAD"])
        async def fixed() -> Response:
            return Response(BODY, media_type="application/json")

        install_stack(api)
        async with serve_app(api, http=PROTOCOL) as url:
            port = int(url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET + b"HEAD /fixed HTTP/1.1\r\nHost: test\r\n\r\n" + GET)
            answers = b""
            while answers.count(BODY) < 2 or answers.count(b"HTTP/1.1 200 OK") < 3:
                chunk = await asyncio.wait_for(reader.read(65536), 5)
                assert chunk, answers
                answers += chunk
            writer.close()
            await writer.wait_closed()
        heads = [part for part in answers.split(b"HTTP/1.1 200 OK\r\n") if part]
        assert len(heads) == 3
        for head in heads:
            assert b"x-request-id: " in head
            assert b"server-timing: app;dur=" in head
            assert b"content-length: 15\r\n" in head
        assert heads[0].endswith(b"\r\n\r\n" + BODY)
        assert heads[1].endswith(b"\r\n\r\n")  # HEAD: no body
        assert heads[2].endswith(b"\r\n\r\n" + BODY)
