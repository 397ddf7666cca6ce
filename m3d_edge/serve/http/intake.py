"""Storing a study: an uploaded body (zip, NIfTI, .npy, one DICOM file) or a path under the allowed root."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from fastapi import Request

from m3d_edge.serve.config import ServeConfig
from m3d_edge.serve.errors import ApiError
from m3d_edge.serve.http.schema import PathRequest
from m3d_edge.serve.http.state import ServerState
from m3d_edge.serve.uploads import (
    StudyEntry,
    check_nifti_size,
    extract_zip,
    hash_path,
    receive_body,
    receive_body_json,
    sniff,
)


async def add_upload(state: ServerState, request: Request) -> tuple[StudyEntry, bool]:
    """Store the raw body as a study; (entry, created) where a known study's bytes give its entry."""
    c, store = state.config, state.store
    staged = store.scratch()
    try:
        blob = staged / "upload.bin"
        study_id, head = await receive_body(request, blob, int(c.max_upload_mb * 2**20))
        if study_id in store.entries:
            return store.entries[study_id], False
        kind = sniff(head)
        if kind is None:
            raise ApiError(415, "unsupported_media_type", "upload is not a zip, NIfTI, .npy or DICOM file")
        rel = await _unpack(c, blob, staged, kind)
        entry = await asyncio.to_thread(
            store.add, study_id, "dicom" if kind == "zip" else kind, staged, rel, None
        )
        return entry, True
    finally:
        shutil.rmtree(staged, ignore_errors=True)


async def _unpack(c: ServeConfig, blob: Path, staged: Path, kind: str) -> str:
    """Lay the uploaded ``blob`` out under ``staged/input``; returns the input's path relative to ``staged``."""
    if kind in ("zip", "dicom"):
        folder = staged / "input" / "dicom"
        if kind == "zip":
            await asyncio.to_thread(
                extract_zip, blob, folder, c.max_zip_entries, int(c.max_unpacked_mb * 2**20)
            )
            blob.unlink()
        else:
            folder.mkdir(parents=True)
            blob.rename(folder / "00000")
        return "input/dicom"
    (staged / "input").mkdir()
    rel = f"input/study.{kind}"
    blob.rename(staged / rel)
    if kind.startswith("nii"):
        await asyncio.to_thread(check_nifti_size, staged / rel, int(c.max_unpacked_mb * 2**20))
    return rel


async def add_path(state: ServerState, request: Request) -> tuple[StudyEntry, bool]:
    """Store the study named by ``{"path": ...}`` inside the allowed root; (entry, created)."""
    root = state.config.allowed_root
    if root is None:
        raise ApiError(403, "paths_disabled", "this server takes uploads only (no --allowed-root configured)")
    raw = await receive_body_json(request)
    req = PathRequest.model_validate(raw)
    root = Path(root).resolve()
    target = (root / req.path).resolve()
    if not target.is_relative_to(root):
        raise ApiError(403, "path_outside_root", "the path is outside the server's allowed root")
    if not target.exists():
        raise ApiError(422, "bad_study", "no such file or folder under the allowed root")
    study_id = await asyncio.to_thread(hash_path, target)
    if study_id in state.store.entries:
        return state.store.entries[study_id], False
    staged = state.store.scratch()
    try:
        entry = await asyncio.to_thread(state.store.add, study_id, "path", staged, None, target)
        return entry, True
    finally:
        shutil.rmtree(staged, ignore_errors=True)
