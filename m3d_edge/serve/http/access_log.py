"""ASGI middleware: one log line and the request metrics per request, by route template."""

from __future__ import annotations

import logging
import time
from typing import Any

from m3d_edge.serve.metrics import Metrics

log = logging.getLogger("m3d_edge.serve")


class AccessLog:
    """One log line and the request metrics per request, by route template.

    Logs method, route template, status, milliseconds and the study id; never query strings, headers
    (keys), bodies or client file names.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, status[0], time.perf_counter() - t0)

    def _record(self, scope: dict, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(scope["method"], template, str(status)).inc()
        self.metrics.latency.labels(scope["method"], template).observe(seconds)
        study = (scope.get("path_params") or {}).get("study_id")
        log.info(
            "%s %s %d %.1f ms%s",
            scope["method"],
            template,
            status,
            seconds * 1000,
            f" study={study}" if study else "",
        )
