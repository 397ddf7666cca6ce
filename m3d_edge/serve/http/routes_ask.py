"""``POST /v1/studies/{id}/ask`` (JSON or Server-Sent Events) and ``GET .../results/{rid}/{file}``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from m3d_edge.serve.errors import ApiError
from m3d_edge.serve.http.asking import ask_job, wait_for_result
from m3d_edge.serve.http.schema import API_VERSION, RESULT_FILES, AskRequest
from m3d_edge.serve.http.sse import stream_events
from m3d_edge.serve.http.state import ServerState
from m3d_edge.serve.uploads import RESULT_ID

RESULT_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"


def add_ask_routes(app: FastAPI, state: ServerState, require: Callable[[str | None], Any]) -> None:
    """Ask a question; fetch its result files."""
    config = state.config

    @app.post(f"/{API_VERSION}/studies/{{study_id}}/ask", tags=["ask"], dependencies=[require("ask")])
    async def ask(study_id: str, body: AskRequest, request: Request) -> Response:
        """The ``Result`` JSON (as ``m3d-edge run --json``); with ``"stream": true`` Server-Sent Events:
        ``event: text`` per delta (``{"text": ...}``), then ``event: result`` (or ``event: error``)."""
        pipe = state.ready()
        entry = state.store.get(study_id)
        kwargs = body.ask_kwargs()
        result_id, result_dir = state.store.result_dir(entry)
        fn = ask_job(state, pipe, entry, body, kwargs, result_dir)
        limit = min(config.timeout_s, body.timeout_s or config.timeout_s)
        job = state.worker.submit(fn, limit, stream=body.stream)
        headers = {"X-Result-Id": result_id}
        if body.stream:
            headers["Cache-Control"] = "no-store"
            return StreamingResponse(stream_events(job), media_type="text/event-stream", headers=headers)
        result = await wait_for_result(job, request)
        return JSONResponse(result, headers=headers)

    @app.get(
        f"/{API_VERSION}/studies/{{study_id}}/results/{{result_id}}/{{name}}",
        tags=["ask"],
        dependencies=[require("ask")],
    )
    async def result_file(study_id: str, result_id: str, name: str) -> FileResponse:
        entry = state.store.get(study_id)
        if name not in RESULT_FILES:
            raise ApiError(404, "unknown_file", f"no result file {name!r} (one of {', '.join(RESULT_FILES)})")
        file, media = RESULT_FILES[name]
        path = entry.results / result_id / file
        if not RESULT_ID.match(result_id) or not path.is_file():
            raise ApiError(404, "unknown_result", f"result {result_id!r} has no {name}")
        return FileResponse(path, media_type=media, headers={"Content-Security-Policy": RESULT_CSP})
