"""``GET /healthz``, ``/readyz``, ``/metrics`` and the OpenAPI document (behind any key)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from m3d_edge.serve.http.schema import API_VERSION
from m3d_edge.serve.http.state import ServerState


def add_health_routes(app: FastAPI, state: ServerState, require: Callable[[str | None], Any]) -> None:
    """Health checks, metrics and the OpenAPI document."""

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> dict:
        pipe = state.ready()
        return {
            "status": "ready",
            "bundle_id": pipe.manifest.bundle_id,
            "verified": state.config.verify_bundle,
        }

    @app.get("/metrics", tags=["health"], dependencies=[require("metrics")])
    async def metrics() -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.get(f"/{API_VERSION}/openapi.json", include_in_schema=False, dependencies=[require(None)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())
