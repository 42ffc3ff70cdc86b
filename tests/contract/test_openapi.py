"""The OpenAPI document says what the server does (issue 16): 422 as problem+json with its
``errors``, a bearer scheme on exactly the protected operations, the withdrawal bounds the
service enforces, 401/403 before 422 on protected routes, and docs that need no CDN."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.fixtures.factories import bearer, login, register
from tests.identity.conftest import app_settings, id_app, id_settings

__all__ = ["app_settings", "id_app", "id_settings"]

PROBLEM = "application/problem+json"


@pytest.fixture
async def schema(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get("/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "responses" in op
    ]


class TestValidationErrors:
    def test_every_422_is_documented_as_problem_json_with_errors(
        self, schema: dict[str, Any]
    ) -> None:
        with_422 = [(p, m, op) for p, m, op in operations(schema) if "422" in op["responses"]]
        assert len(with_422) > 10
        for path, method, op in with_422:
            content = op["responses"]["422"]["content"]
            assert list(content) == [PROBLEM], (method, path)
            assert content[PROBLEM]["schema"] == {"$ref": "#/components/schemas/ValidationProblem"}
        names = schema["components"]["schemas"]
        assert "HTTPValidationError" not in names
        assert "errors" in str(names["ValidationProblem"])

    async def test_the_documented_shape_is_the_one_sent(self, api: httpx.AsyncClient) -> None:
        response = await api.post("/api/v1/auth/register", json={"email": "x"})
        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM
        body = response.json()
        assert {"type", "title", "status", "errors"} <= set(body)  # errors: schema failures
        assert all({"loc", "msg", "type"} <= set(item) for item in body["errors"])


class TestSecurity:
    def test_bearer_scheme_on_exactly_the_protected_operations(
        self, schema: dict[str, Any]
    ) -> None:
        schemes = schema["components"]["securitySchemes"]
        assert schemes["bearerAuth"]["type"] == "http"
        assert schemes["bearerAuth"]["scheme"] == "bearer"
        secured = {(m, p) for p, m, op in operations(schema) if op.get("security")}
        assert ("get", "/api/v1/me") in secured
        assert ("post", "/api/v1/withdrawals") in secured
        assert ("get", "/api/admin/metrics") in secured
        assert ("post", "/api/v1/auth/register") not in secured
        assert ("post", "/api/v1/auth/login") not in secured
        assert ("get", "/api/health") not in secured
        for _, path, op in operations(schema):
            if path.startswith("/api/admin/"):
                assert op.get("security") == [{"bearerAuth": []}], path

    @pytest.mark.parametrize(
        "path", ["/api/v1/withdrawals", "/api/v1/topups", "/api/v1/operations"]
    )
    def test_money_moving_posts_require_an_idempotency_key(
        self, schema: dict[str, Any], path: str
    ) -> None:
        """ADR 0035: the header is documented as required, and its absence as a 428."""
        op = schema["paths"][path]["post"]
        [header] = [p for p in op.get("parameters", []) if p["name"] == "Idempotency-Key"]
        assert header["in"] == "header"
        assert header["required"] is True
        assert "428" in op["responses"]

    @pytest.mark.parametrize(
        "path", ["/api/admin/withdrawals/batch-approve", "/api/v1/withdrawals"]
    )
    async def test_malformed_json_without_a_token_is_401_not_422(
        self, api: httpx.AsyncClient, path: str
    ) -> None:
        response = await api.post(
            path, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == PROBLEM

    async def test_malformed_json_from_a_non_admin_is_403(self, api: httpx.AsyncClient) -> None:
        email, _ = await register(api)
        tokens = await login(api, email)
        response = await api.post(
            "/api/admin/withdrawals/batch-approve",
            content=b"{not json",
            headers={"content-type": "application/json", **bearer(tokens)},
        )
        assert response.status_code == 403, response.text

    async def test_a_public_route_still_answers_422(self, api: httpx.AsyncClient) -> None:
        response = await api.post(
            "/api/v1/auth/login", content=b"{not", headers={"content-type": "application/json"}
        )
        assert response.status_code == 422


class TestConstraints:
    def test_withdrawal_amount_bounds_are_the_settings(
        self, schema: dict[str, Any], id_app: FastAPI
    ) -> None:
        settings = id_app.state.runtime.settings
        amount = schema["components"]["schemas"]["WithdrawalCreate"]["properties"]["amount"]
        assert amount["minimum"] == settings.WALLET_WITHDRAWAL_MIN
        assert amount["maximum"] == settings.WALLET_WITHDRAWAL_MAX
        assert "exclusiveMinimum" not in amount


class TestDocs:
    @pytest.mark.parametrize("page", ["/docs", "/redoc"])
    async def test_docs_load_their_assets_from_this_server(
        self, api: httpx.AsyncClient, page: str
    ) -> None:
        html = (await api.get(page)).text
        assert "cdn" not in html.lower()
        assets = [part.split('"')[0] for part in html.split('src="')[1:]]
        assets += [part.split('"')[0] for part in html.split('href="')[1:]]
        local = [a for a in assets if a.startswith("/docs-assets/")]
        assert local, html
        for asset in local:
            response = await api.get(asset)
            assert response.status_code == 200, asset
            assert len(response.content) > 1000, asset
