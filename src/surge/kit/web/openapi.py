"""Make the OpenAPI document say what the server does (what generated clients rely on).

``install_contract(app, ...)`` wraps ``app.openapi``:

- every ``422`` is documented as the ``application/problem+json`` it is, with its ``errors``
  array (``ValidationProblem``), not FastAPI's ``HTTPValidationError`` JSON;
- (the bearer scheme and each operation's ``security`` come from the ``HTTPBearer``
  dependency the authentication declares);
- ``constraints`` overwrite a schema property's documented bounds with the ones the server
  enforces at run time (from settings), e.g. ``{"OrderCreate": {"amount": {"minimum": 100}}}``.

Install it after ``install_problem_handlers`` (which adds the ``Problem`` schema).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from surge.kit.web.problem import PROBLEM_JSON, PROBLEM_SCHEMA

VALIDATION_PROBLEM_SCHEMA: dict[str, Any] = {
    "allOf": [
        {"$ref": "#/components/schemas/Problem"},
        {
            "type": "object",
            "properties": {
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "loc": {
                                "type": "array",
                                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                            },
                            "msg": {"type": "string"},
                            "type": {"type": "string"},
                        },
                        "required": ["loc", "msg", "type"],
                    },
                }
            },
        },
    ],
    "description": "RFC 9457 problem details of a request that failed validation: `errors` "
    "lists each field that failed the schema; a request that passes the schema but breaks a "
    "rule of the service (an amount out of bounds) has a `detail` and no `errors`.",
}

_UNPROCESSABLE = {
    "description": "The request failed validation (RFC 9457 problem details, with `errors`).",
    "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ValidationProblem"}}},
}


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if isinstance(operation, dict) and "responses" in operation:
                out.append((path, method, operation))
    return out


def install_contract(
    app: FastAPI,
    *,
    constraints: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # FastAPI caches it; every step below is idempotent
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas.setdefault("Problem", PROBLEM_SCHEMA)
        schemas["ValidationProblem"] = VALIDATION_PROBLEM_SCHEMA
        for _, _, operation in _operations(schema):
            if "422" in operation["responses"]:
                operation["responses"]["422"] = _UNPROCESSABLE
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)

        for model, fields in (constraints or {}).items():
            properties = schemas.get(model, {}).get("properties", {})
            for field, bounds in fields.items():
                if field in properties:
                    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                        properties[field].pop(key, None)
                    properties[field].update(bounds)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
