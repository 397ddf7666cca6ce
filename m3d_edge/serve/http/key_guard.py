"""The route dependency that checks the request's API key and the route's scope (401 / 403)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request

from m3d_edge.serve.auth import match_key
from m3d_edge.serve.config import ServeConfig
from m3d_edge.serve.errors import ApiError


def api_key(request: Request) -> str | None:
    """The key of ``Authorization: Bearer KEY``, else of ``X-API-Key``."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def key_guard(config: ServeConfig):
    """``require(scope)``: the dependency a route takes; ``scope=None`` accepts any valid key."""

    def require(scope: str | None) -> Any:
        async def check(request: Request) -> None:
            if config.no_auth:
                return
            key = match_key(api_key(request), config.api_keys)
            if key is None:
                raise ApiError(
                    401, "unauthorized", "missing or unknown API key", {"WWW-Authenticate": "Bearer"}
                )
            if scope is not None and scope not in key.scopes:
                raise ApiError(403, "forbidden", f"this API key is not allowed the {scope!r} routes")

        return Depends(check)

    return require
