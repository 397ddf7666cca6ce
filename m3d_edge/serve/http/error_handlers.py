"""Every refusal is JSON with a stable code: the app's exception handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from m3d_edge.errors import M3DEdgeError
from m3d_edge.serve.errors import ApiError, from_library

log = logging.getLogger("m3d_edge.serve")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def _library_error(request: Request, exc: M3DEdgeError) -> JSONResponse:
    return error_response(from_library(exc))


async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
    return error_response(ApiError(400, "bad_request", "; ".join(parts) or "invalid request"))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(ApiError(exc.status_code, code, str(exc.detail)))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    route = getattr(request.scope.get("route"), "path", "unmatched")
    log.error("unexpected %s on %s", type(exc).__name__, route)
    return error_response(ApiError(500, "internal_error", f"unexpected {type(exc).__name__}"))


def install_error_handlers(app: FastAPI) -> None:
    """API errors, library errors (by class), validation, routing and unexpected errors -> JSON."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(M3DEdgeError, _library_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
