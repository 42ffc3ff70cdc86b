"""The `ping` baseline: a bare FastAPI app, no middleware, the same /livez body as Surge's.

FastAPI's native OpenTelemetry hooks are off here as they are in Surge (``OTEL_ENABLED``
defaults to false): the ratio then measures Surge's own stack, not a FastAPI setting."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.responses import Response

app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})


@app.get("/livez")
async def livez() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
