"""``POST /v1/studies`` (upload or name a study), ``GET`` and ``DELETE /v1/studies/{id}``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from m3d_edge.serve.http.intake import add_path, add_upload
from m3d_edge.serve.http.schema import API_VERSION
from m3d_edge.serve.http.state import ServerState

log = logging.getLogger("m3d_edge.serve")


def add_study_routes(app: FastAPI, state: ServerState, require: Callable[[str | None], Any]) -> None:
    """Upload, look up and delete studies."""

    @app.post(f"/{API_VERSION}/studies", tags=["studies"], status_code=201, dependencies=[require("studies")])
    async def upload_study(request: Request) -> JSONResponse:
        """Upload a study as the raw body (zip of DICOM, .nii, .nii.gz, M3D .npy, one DICOM file), or send
        ``{"path": "..."}`` (JSON) to name one inside the server's allowed root. Same bytes, same id."""
        async with state.uploads:
            if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
                entry, created = await add_path(state, request)
            else:
                entry, created = await add_upload(state, request)
        log.info("study %s %s (%s)", entry.study_id, "added" if created else "known", entry.kind)
        body = {"study_id": entry.study_id, "created": created, **entry.info}
        return JSONResponse(body, status_code=201 if created else 200)

    @app.get(f"/{API_VERSION}/studies/{{study_id}}", tags=["studies"], dependencies=[require("ask")])
    async def get_study(study_id: str) -> dict:
        entry = state.store.get(study_id)
        return {"study_id": entry.study_id, "created": False, **entry.info}

    @app.delete(f"/{API_VERSION}/studies/{{study_id}}", tags=["studies"], dependencies=[require("studies")])
    async def delete_study(study_id: str) -> dict:
        entry = state.store.get(study_id)

        def forget() -> None:  # on the model thread, after the questions already queued
            if state.pipeline is not None and entry.input.exists():
                state.pipeline.forget(entry.input)
            state.store.delete(study_id)

        await asyncio.wrap_future(state.worker.run_in_order(forget))
        return {"study_id": study_id, "deleted": True}
