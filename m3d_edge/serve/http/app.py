"""The app factory: state, lifespan (load the bundle, close the worker), middleware, errors, routes."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from m3d_edge.errors import PromptError
from m3d_edge.serve.config import ServeConfig
from m3d_edge.serve.http.access_log import AccessLog
from m3d_edge.serve.http.error_handlers import install_error_handlers
from m3d_edge.serve.http.key_guard import key_guard
from m3d_edge.serve.http.routes_ask import add_ask_routes
from m3d_edge.serve.http.routes_health import add_health_routes
from m3d_edge.serve.http.routes_studies import add_study_routes
from m3d_edge.serve.http.schema import API_VERSION
from m3d_edge.serve.http.state import ServerState

log = logging.getLogger("m3d_edge.serve")


def create_app(config: ServeConfig, pipeline: Any | None = None) -> FastAPI:
    """The FastAPI application; the bundle is opened in the background unless ``pipeline`` is given."""
    if not config.api_keys and not config.no_auth:
        raise PromptError("no API keys configured: give --api-key-file FILE or set M3D_EDGE_API_KEYS")
    state = ServerState(config, pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.pipeline is None:
            threading.Thread(target=state.load, name="m3d-load", daemon=True).start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.worker.close)
            state.cleanup()
            log.info("stopped")

    app = FastAPI(
        title="m3d-edge",
        version=API_VERSION,
        summary="M3D-LaMed on the edge: ask questions about CT studies.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by routes_health, behind a key
    )
    app.state.m3d = state
    _add_middleware(app, config, state)
    install_error_handlers(app)
    require = key_guard(config)
    for add_routes in (add_health_routes, add_study_routes, add_ask_routes):
        add_routes(app, state, require)
    return app


def _add_middleware(app: FastAPI, config: ServeConfig, state: ServerState) -> None:
    """CORS for the configured origins (if any), inside the access log."""
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["X-Result-Id", "Retry-After"],
        )
    app.add_middleware(AccessLog, metrics=state.metrics)
