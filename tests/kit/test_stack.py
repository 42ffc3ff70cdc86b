"""The assembled ASGI stack (``kit.web.stack``, ADR 0029): one Surge layer around the app's
own middleware and the router, doing what FastAPI's wrapping layers did."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import structlog
from fastapi import FastAPI
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from surge.kit.errors import Conflict
from surge.kit.web.admission import Admission
from surge.kit.web.errors import FileStack
from surge.kit.web.middleware import SurgeMiddleware
from surge.kit.web.problem import install_problem_handlers
from surge.kit.web.stack import install_stack


class Reraised(Exception):
    """Its handler gives it back: a bug, answered 500."""


class Inner:
    """An inner middleware that raises on some paths, as a buggy or refusing layer would."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if path == "/inner/conflict":
            raise Conflict("taken by an inner layer")
        if path == "/inner/bug":
            raise RuntimeError("secret internals")
        if path == "/inner/reraised":
            raise Reraised
        await self.app(scope, receive, send)


def build(*, otel: bool = False) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    async def give_back(request: object, error: Exception) -> None:
        raise error

    app.add_exception_handler(Reraised, give_back)

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/conflict")
    async def conflict() -> None:
        raise Conflict("taken by the route")

    app.add_middleware(Inner)
    install_stack(app, otel=otel, admission={"max_in_flight": 4, "patience": 2.0})
    return app


def layers(app: ASGIApp) -> list[type]:
    out: list[type] = []
    while app is not None:
        out.append(type(app))
        app = getattr(app, "app", None)  # type: ignore[assignment]
    return out


def test_one_layer_around_the_apps_own_middleware() -> None:
    app = build()
    stack = app.build_middleware_stack()
    assert isinstance(stack, SurgeMiddleware)
    assert isinstance(stack.admission, Admission)
    assert isinstance(stack.app, Inner)
    assert stack.app.app is app.router
    assert ServerErrorMiddleware not in layers(stack)
    assert ExceptionMiddleware not in layers(stack)


def test_fastapis_own_stack_when_opentelemetry_is_on() -> None:
    """Its telemetry layers are wanted then: Surge's layer is its outermost user middleware."""
    stack = build(otel=True).build_middleware_stack()
    found = layers(stack)
    assert found[0] is ServerErrorMiddleware
    assert SurgeMiddleware in found
    assert ExceptionMiddleware in found
    assert found.index(SurgeMiddleware) < found.index(Inner) < found.index(ExceptionMiddleware)


@pytest.fixture(params=[False, True], ids=["surge-stack", "fastapi-stack"])
async def client(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = build(otel=request.param)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield app, http


def problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"]
    body = response.json()
    assert body["status"] == status
    return dict(body)


async def test_every_error_is_a_problem_with_a_request_id(
    client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, http = client
    ok = await http.get("/ok")
    assert ok.status_code == 200
    assert ok.headers["x-request-id"]
    assert "app;dur=" in ok.headers["server-timing"]
    problem(await http.get("/nope"), 404)
    problem(await http.post("/ok"), 405)
    assert problem(await http.get("/conflict"), 409)["detail"] == "taken by the route"
    assert "secret" not in (await http.get("/inner/bug")).text
    problem(await http.get("/inner/bug"), 500)
    problem(await http.get("/inner/reraised"), 500)
    stack = app.middleware_stack
    while not isinstance(stack, SurgeMiddleware):
        stack = stack.app  # type: ignore[union-attr]
    assert stack.admission is not None
    assert stack.admission.in_flight == 0


async def test_an_inner_layers_error_goes_to_its_handler() -> None:
    """Raised outside any route: the handler answers (it was a bare 500 when only Starlette's
    ExceptionMiddleware, inside the Surge layer's own middleware, looked for one)."""
    app = build()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        body = problem(await http.get("/inner/conflict"), 409)
    assert body["detail"] == "taken by an inner layer"


async def test_file_stack_closes_only_what_was_pushed() -> None:
    closed: list[str] = []
    idle, used = FileStack(), FileStack()
    assert not idle.used

    async def close() -> None:
        closed.append("file")

    used.push_async_callback(close)
    assert used.used
    await used.aclose()
    assert closed == ["file"]


class TestDeadlinesAcrossEventLoops:
    """``SurgeMiddleware`` remembers the loop it runs in to find the running task without a
    ``getpid`` per request (ADR 0049): a later loop in the same thread (as each test's own)
    must still get its own task's deadline, never a stale loop's."""

    @staticmethod
    def serve_two(layer: SurgeMiddleware) -> list[int]:
        """One request that never finishes and one that answers at once, concurrently."""
        import asyncio

        statuses: list[int] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["path"] == "/stuck":
                await asyncio.Event().wait()  # only the deadline ends it
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        layer.app = app

        async def call(path: str) -> None:
            scope: Scope = {"type": "http", "method": "GET", "path": path, "headers": []}

            async def receive() -> dict[str, object]:
                return {"type": "http.request", "body": b""}

            async def send(message: dict[str, object]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(int(message["status"]))  # type: ignore[call-overload]

            await layer(scope, receive, send)  # type: ignore[arg-type]

        async def both() -> None:
            await asyncio.gather(call("/stuck"), call("/fast"))

        asyncio.run(both())
        return sorted(statuses)

    def test_each_loop_times_out_its_own_request(self) -> None:
        layer = SurgeMiddleware(lambda *_: None, timeout=0.05)  # type: ignore[arg-type]
        assert self.serve_two(layer) == [200, 504]
        assert self.serve_two(layer) == [200, 504]  # a new loop, same thread

    def test_one_sweeper_serves_consecutive_quick_requests(self) -> None:
        """A request that ends before the sweeper's first step (every ``/livez``) must not
        leave it to end at once: the next request would start another task (ADR 0049)."""
        import asyncio

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        layer = SurgeMiddleware(app, timeout=30.0)
        scope: Scope = {"type": "http", "method": "GET", "path": "/quick", "headers": []}

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b""}

        async def send(message: object) -> None:
            return None

        async def requests() -> list[asyncio.Task[None] | None]:
            seen = []
            for _ in range(3):
                await asyncio.create_task(layer(dict(scope), receive, send))
                for _ in range(3):  # loop iterations: the sweeper takes its first steps
                    await asyncio.sleep(0)
                seen.append(layer._sweeper)
            assert seen[-1] is not None
            assert not seen[-1].done()
            return seen

        first, second, third = asyncio.run(requests())
        assert first is second is third


@pytest.fixture
def info_logs() -> Iterator[None]:
    """Log lines at info reach ``capture_logs``: a test run before may have configured the
    process's logging at WARNING (``surge.kit.telemetry.logging``), which filters them out
    before any processor sees them."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        yield
    finally:
        structlog.configure(**saved)


class TestWhatEachRequestLeaves:
    """What ``SurgeMiddleware`` adds to every response and records for every request, on
    each way a request can end: the headers (request id, the inner layers' extra headers,
    ``Server-Timing``), the status its RED metrics get, and whether it is logged (the access
    log policy). Pins the per-request work the hot path was trimmed around (ADR 0061)."""

    class Recorder:
        """``metrics.REQUESTS``'s interface, keeping what it is told."""

        def __init__(self) -> None:
            self.in_flight = 0
            self.statuses: list[int] = []
            self.untimed_count = 0

        def started(self) -> None:
            self.in_flight += 1

        def finished(self, method: str, route: object, status: int, seconds: float) -> None:
            assert seconds >= 0
            self.in_flight -= 1
            self.statuses.append(status)

        def untimed(self) -> None:
            self.in_flight -= 1
            self.untimed_count += 1

    @pytest.fixture
    def recorder(self, monkeypatch: pytest.MonkeyPatch) -> TestWhatEachRequestLeaves.Recorder:
        from surge.kit.telemetry import metrics

        fake = self.Recorder()
        monkeypatch.setattr(metrics, "REQUESTS", fake)
        return fake

    @staticmethod
    async def serve(
        layer: SurgeMiddleware, path: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> list[dict[str, object]]:
        sent: list[dict[str, object]] = []
        scope: Scope = {
            "type": "http", "method": "GET", "path": path, "headers": headers or [],
            "http_version": "1.1",
        }  # fmt: skip

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        await layer(scope, receive, send)  # type: ignore[arg-type]
        return sent

    @staticmethod
    def app() -> ASGIApp:
        import asyncio

        from starlette.exceptions import HTTPException

        from surge.kit.web.middleware import RESPONSE_HEADERS, UNTIMED

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            path = scope["path"]
            scope["route"] = path
            if path == "/limited":  # an inner layer's headers (the rate limiter's)
                scope[RESPONSE_HEADERS].append((b"ratelimit", b"limit=5"))
            if path == "/missing":
                raise HTTPException(404)
            if path == "/bug":
                raise RuntimeError("secret")
            if path == "/stuck":
                await asyncio.Event().wait()
            if path == "/stream":
                scope[UNTIMED] = True
            start = {"type": "http.response.start", "status": 201, "headers": [(b"a", b"1")]}
            await send(start)
            if path == "/half":
                raise RuntimeError("after the head")
            await send({"type": "http.response.body", "body": b"ok"})

        return app

    def layer(self, **options: object) -> SurgeMiddleware:
        handlers = _handlers_of(FastAPI())
        return SurgeMiddleware(self.app(), exception_handlers=handlers, **options)  # type: ignore[arg-type]

    async def test_headers_in_order_and_the_body_untouched(self, recorder: Recorder) -> None:
        sent = await self.serve(self.layer(), "/limited", [(b"x-request-id", b"given-1")])
        names = [name for name, _ in sent[0]["headers"]]  # type: ignore[attr-defined]
        assert names == [b"a", b"x-request-id", b"ratelimit", b"server-timing"]
        headers = dict(sent[0]["headers"])  # type: ignore[call-overload]
        assert headers[b"x-request-id"] == b"given-1"
        assert headers[b"server-timing"].startswith(b"app;dur=")
        assert sent[1] == {"type": "http.response.body", "body": b"ok"}
        stamped = await self.serve(self.layer(), "/ok", [(b"x-request-start", b"t=1")])
        assert dict(stamped[0]["headers"])[b"server-timing"].startswith(b"queue;dur=")  # type: ignore[call-overload]
        quiet = await self.serve(self.layer(server_timing=False), "/ok")
        assert [name for name, _ in quiet[0]["headers"]] == [b"a", b"x-request-id"]  # type: ignore[attr-defined]

    async def test_each_ending_records_its_status(self, recorder: Recorder) -> None:
        layer = self.layer(timeout=0.05, body_limit=10)
        assert (await self.serve(layer, "/ok"))[0]["status"] == 201
        assert (await self.serve(layer, "/missing"))[0]["status"] == 404
        assert (await self.serve(layer, "/bug"))[0]["status"] == 500
        assert (await self.serve(layer, "/stuck"))[0]["status"] == 504
        big = await self.serve(layer, "/ok", [(b"content-length", b"11")])
        assert big[0]["status"] == 413
        half = await self.serve(layer, "/half")  # failed after its head: no second answer
        assert [m["type"] for m in half] == ["http.response.start"]
        await self.serve(layer, "/stream")
        assert recorder.statuses == [201, 404, 500, 504, 413, 201]  # /half: its head went
        assert recorder.untimed_count == 1
        assert recorder.in_flight == 0

    @pytest.mark.usefixtures("info_logs")
    async def test_the_access_log_policy(self, recorder: Recorder) -> None:
        from structlog.testing import capture_logs

        with capture_logs() as quiet:
            await self.serve(self.layer(), "/ok")
        assert [e for e in quiet if e["event"] == "http.request"] == []
        with capture_logs() as every:
            await self.serve(self.layer(access_log=True), "/ok")
        assert [e["status"] for e in every if e["event"] == "http.request"] == [201]
        with capture_logs() as slow:
            await self.serve(self.layer(slow_request=0.0), "/ok")
        assert [e["status"] for e in slow if e["event"] == "http.request"] == [201]
        with capture_logs() as failed:
            await self.serve(self.layer(), "/bug")
        assert [e["status"] for e in failed if e["event"] == "http.request"] == [500]


def _handlers_of(app: FastAPI) -> tuple[dict[object, object], dict[int, object]]:
    from surge.kit.web.stack import _handlers

    install_problem_handlers(app)
    return _handlers(app)  # type: ignore[return-value]
