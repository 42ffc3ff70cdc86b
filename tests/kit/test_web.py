"""problem+json for every error, request ids, body limit, request timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from http import HTTPStatus

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import text

from surge.app import create_app
from surge.config import Settings
from surge.kit.errors import Conflict, SurgeError
from surge.kit.web.deps import SessionDep
from surge.kit.web.idempotency import IdempotencyKeyRequired
from surge.kit.web.problem import problem_title
from tests.fixtures.clients import app_client
from tests.fixtures.settings import make_settings


class Item(BaseModel):
    name: str
    quantity: int


class Stored(BaseModel):
    name: str = "ok"
    at: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    big: int = 1


@pytest.fixture
async def web(server_urls: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    settings: Settings = make_settings(*server_urls, REQUEST_BODY_LIMIT=1000, REQUEST_TIMEOUT=0.3)
    app: FastAPI = create_app(settings)

    @app.post("/t/items", status_code=201)
    async def create_item(item: Item) -> Item:
        return item

    @app.get("/t/items")
    async def list_items() -> list[Item]:
        return []

    @app.get("/t/key-required")
    async def key_required() -> None:
        raise IdempotencyKeyRequired()

    @app.get("/t/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    @app.get("/t/conflict")
    async def conflict() -> None:
        raise Conflict("already there", extra={"existing_id": 7})

    @app.get("/t/slow")
    async def slow() -> None:
        await asyncio.sleep(5)

    @app.post("/t/store", status_code=204)
    async def store(body: Stored, session: SessionDep) -> None:
        """Valid to pydantic, not to PostgreSQL: NUL text, a date pushed past year 9999."""
        await session.execute(
            text("SELECT CAST(:n AS text), CAST(:at AS timestamptz), CAST(:big AS bigint)"),
            {"n": body.name, "at": body.at, "big": body.big},
        )

    async for client in app_client(app):
        yield client


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    assert "type" in body
    return dict(body)


async def test_404_is_problem(web: httpx.AsyncClient) -> None:
    assert_problem(await web.get("/no/such/route"), 404)


async def test_405_is_problem(web: httpx.AsyncClient) -> None:
    assert_problem(await web.delete("/livez"), 405)


async def test_405_allows_every_method_of_the_path(web: httpx.AsyncClient) -> None:
    """GET and POST declared apart: a PUT is told both (Starlette named only the first)."""
    response = await web.put("/t/items", json={})
    assert_problem(response, 405)
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST"}


async def test_title_names_the_status_sent(web: httpx.AsyncClient) -> None:
    """An error class that sets only its status does not inherit "Internal Server Error"."""
    body = assert_problem(await web.get("/t/key-required"), 428)
    assert body["title"] == "Precondition Required"


def test_every_error_class_has_a_title_for_its_own_status() -> None:
    """Every SurgeError of the assembled app (kit and domains): a class-level title
    written for another status never reaches a client."""
    import surge.worker  # noqa: F401  (every domain's errors, jobs included)

    def subclasses(cls: type[SurgeError]) -> Iterator[type[SurgeError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    wrong = {}
    for cls in set(subclasses(SurgeError)):
        error = cls.__new__(cls)  # the class's status and title, whatever its constructor
        title = problem_title(error)
        if cls.status_code != 500 and title == "Internal Server Error":
            wrong[cls.__qualname__] = title
        if title not in (HTTPStatus(cls.status_code).phrase, cls.title):
            wrong[cls.__qualname__] = title
    assert not wrong


async def test_422_lists_the_errors(web: httpx.AsyncClient) -> None:
    body = assert_problem(await web.post("/t/items", json={"name": "x", "quantity": "many"}), 422)
    errors = body["errors"]
    assert isinstance(errors, list)
    assert errors[0]["loc"] == ["body", "quantity"]


async def test_malformed_json_is_422(web: httpx.AsyncClient) -> None:
    response = await web.post(
        "/t/items", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422)


async def test_values_the_database_cannot_store_are_422(web: httpx.AsyncClient) -> None:
    assert (await web.post("/t/store", json={})).status_code == 204
    for body in (
        {"name": "a\u0000b"},
        {"at": "9999-12-31T23:59:59-23:59"},
        {"at": "0001-01-01T00:00:00+23:59"},
        {"big": 2**63},
    ):
        problem = assert_problem(await web.post("/t/store", json=body), 422)
        assert problem["title"] == "Unprocessable Content"


async def test_openapi_documents_problem_responses(web: httpx.AsyncClient) -> None:
    spec = (await web.get("/openapi.json")).json()
    assert "Problem" in spec["components"]["schemas"]
    for operations in spec["paths"].values():
        for operation in operations.values():
            default = operation["responses"]["default"]
            assert "application/problem+json" in default["content"]


async def test_500_hides_internals(web: httpx.AsyncClient) -> None:
    response = await web.get("/t/boom")
    body = assert_problem(response, 500)
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    assert body["title"] == "Internal Server Error"
    assert response.headers["x-request-id"]


async def test_domain_error_carries_status_and_extra(web: httpx.AsyncClient) -> None:
    body = assert_problem(await web.get("/t/conflict"), 409)
    assert body["detail"] == "already there"
    assert body["existing_id"] == 7
    assert str(body["type"]).endswith("/conflict")


async def test_413_by_content_length(web: httpx.AsyncClient) -> None:
    response = await web.post(
        "/t/items", content=b"x" * 5000, headers={"content-type": "application/json"}
    )
    assert_problem(response, 413)


async def test_413_for_streamed_body_without_length(web: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 500

    response = await web.post(
        "/t/items", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(response, 413)


async def test_valid_body_under_limit_passes(web: httpx.AsyncClient) -> None:
    response = await web.post("/t/items", json={"name": "x", "quantity": 2})
    assert response.status_code == 201
    assert response.json() == {"name": "x", "quantity": 2}


async def test_request_timeout_is_504(web: httpx.AsyncClient) -> None:
    assert_problem(await web.get("/t/slow"), 504)


async def test_request_id_is_echoed_or_made(web: httpx.AsyncClient) -> None:
    given = await web.get("/livez", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await web.get("/livez")
    assert len(made.headers["x-request-id"]) == 32
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = await web.get("/livez", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert traced.headers["x-request-id"] == trace
    hostile = await web.get("/livez", headers={"X-Request-ID": "bad id\twith spaces"})
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"


async def test_metrics_use_route_templates(web: httpx.AsyncClient) -> None:
    await web.get("/livez")
    await web.get("/definitely/not/here/123")
    text = (await web.get("/metrics")).text
    assert 'http_request_duration_seconds_count{method="GET",route="/livez"}' in text
    assert 'route="<unmatched>"' in text
    assert "/definitely/not/here/123" not in text
    assert "db_pool_checked_out" in text


async def test_nested_router_metrics_keep_every_prefix(server_urls: tuple[str, str]) -> None:
    from fastapi import APIRouter

    app = create_app(make_settings(*server_urls))
    outer, inner = APIRouter(prefix="/t/outer"), APIRouter(prefix="/inner")

    @inner.get("/{key}")
    async def deep(key: str) -> dict[str, str]:
        return {"key": key}

    outer.include_router(inner)
    app.include_router(outer)
    async for client in app_client(app):
        assert (await client.get("/t/outer/inner/abc")).status_code == 200
        text = (await client.get("/metrics")).text
        assert 'route="/t/outer/inner/{key}"' in text


def test_batched_request_metrics_land_in_the_right_buckets() -> None:
    """RequestRecorder writes prometheus-client's histogram internals; this fails loudly if a
    new prometheus-client version moves them."""
    from prometheus_client import REGISTRY

    from surge.kit.telemetry.metrics import RequestRecorder

    recorder = RequestRecorder()
    route = "/t/recorder-check"
    for seconds in (0.0005, 0.003, 0.003, 0.2, 45.0):
        recorder.started()
        recorder.finished("GET", route, 200, seconds)
    recorder.started()
    recorder.finished("GET", route, 503, 0.01)
    recorder.flush()

    def sample(name: str, **labels: str) -> float:
        value = REGISTRY.get_sample_value(name, {"method": "GET", "route": route, **labels})
        return float(value or 0.0)

    assert sample("http_requests_total", status="200") == 5
    assert sample("http_requests_total", status="503") == 1
    assert sample("http_request_duration_seconds_count") == 6
    assert sample("http_request_duration_seconds_bucket", le="0.001") == 1
    assert sample("http_request_duration_seconds_bucket", le="0.005") == 3
    assert sample("http_request_duration_seconds_bucket", le="0.01") == 4
    assert sample("http_request_duration_seconds_bucket", le="0.25") == 5
    assert sample("http_request_duration_seconds_bucket", le="30.0") == 5
    assert sample("http_request_duration_seconds_bucket", le="+Inf") == 6
    assert abs(sample("http_request_duration_seconds_sum") - 45.2165) < 1e-9


def test_request_metrics_are_keyed_by_route_object_and_labelled_by_its_template() -> None:
    """The middleware records the matched route object (ADR 0056): an unhashable one (FastAPI's
    effective route contexts are dataclasses) works, two objects with one template add up
    in one series, and None is the unmatched label."""
    from dataclasses import dataclass

    from prometheus_client import REGISTRY

    from surge.kit.telemetry.metrics import RequestRecorder

    @dataclass
    class Context:  # eq=True and no frozen: unhashable, as FastAPI's
        path: str

    recorder = RequestRecorder()
    first, second = Context("/t/objects/{id}"), Context("/t/objects/{id}")
    for route, status in ((first, 200), (second, 200), (second, 404), (None, 404)):
        recorder.started()
        recorder.finished("PUT", route, status, 0.003)
    recorder.flush()

    def sample(name: str, route: str, **labels: str) -> float:
        value = REGISTRY.get_sample_value(name, {"method": "PUT", "route": route, **labels})
        return float(value or 0.0)

    assert sample("http_requests_total", "/t/objects/{id}", status="200") == 2
    assert sample("http_requests_total", "/t/objects/{id}", status="404") == 1
    assert sample("http_request_duration_seconds_count", "/t/objects/{id}") == 3
    assert sample("http_request_duration_seconds_bucket", "/t/objects/{id}", le="0.005") == 3
    assert sample("http_requests_total", "<unmatched>", status="404") == 1


class TestHotRoutes:
    def test_promoted_routes_are_matched_first_and_duplicates_keep_their_order(self) -> None:
        from surge.kit.web.routing import promote_routes

        app = FastAPI()

        @app.get("/a")
        async def a() -> dict[str, str]:
            return {"route": "a"}

        @app.get("/hot")
        async def hot() -> dict[str, str]:
            return {"route": "hot"}

        @app.get("/twice")
        async def first_twice() -> dict[str, str]:
            return {"route": "first"}

        @app.get("/twice")
        async def second_twice() -> dict[str, str]:  # shadowed by the first
            return {"route": "second"}

        moved = promote_routes(app, ["/hot", "/twice", "/missing"])
        assert moved == ["/hot"]
        paths = [getattr(r, "path", None) for r in app.router.routes]
        assert paths[0] == "/hot"
        assert paths.index("/a") < paths.index("/twice")  # the rest keeps its order

    async def test_shortcut_answers_when_it_can_and_the_route_otherwise(self) -> None:
        from starlette.types import Scope

        from surge.kit.web.routing import shortcut_route

        app = FastAPI()

        @app.get("/hot")
        async def hot(who: str = "route") -> dict[str, str]:
            return {"from": who}

        def answer(scope: Scope) -> bytes | None:
            return b'{"from":"shortcut"}' if scope["query_string"] == b"" else None

        shortcut_route(app, hot, answer)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            quick = await client.get("/hot")
            full = await client.get("/hot", params={"who": "full"})
            wrong_method = await client.post("/hot")
        assert quick.status_code == 200
        assert quick.json() == {"from": "shortcut"}
        assert quick.headers["content-type"] == "application/json"
        assert quick.headers["content-length"] == str(len(b'{"from":"shortcut"}'))
        assert full.json() == {"from": "full"}  # None: FastAPI's route answers
        assert wrong_method.status_code == 405  # matching stays the route's
        assert "/hot" in app.openapi()["paths"]

    async def test_shortcut_needs_exactly_one_route(self) -> None:
        from surge.kit.web.routing import shortcut_route

        app = FastAPI()

        async def twice() -> dict[str, str]:
            return {}

        app.add_api_route("/a", twice)
        app.add_api_route("/b", twice)
        with pytest.raises(RuntimeError, match="2 routes"):
            shortcut_route(app, twice, lambda scope: None)

    async def test_json_bytes_response_is_a_complete_json_response(self) -> None:
        from surge.kit.web.responses import JSONBytes

        app = FastAPI()

        @app.get("/j")
        async def j() -> JSONBytes:
            return JSONBytes(b'{"ok":true}', status_code=202)

        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            response = await client.get("/j")
        assert response.status_code == 202
        assert response.headers["content-type"] == "application/json"
        assert response.headers["content-length"] == "11"
        assert response.json() == {"ok": True}
