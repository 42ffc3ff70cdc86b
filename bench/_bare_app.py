"""The `ping` baseline: a bare FastAPI app, no middleware, the same /livez body as Surge's."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.responses import Response

app = FastAPI()


@app.get("/livez")
async def livez() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")
