"""Study intake for the HTTP API: bounded uploads, type sniffing, safe zip extraction, a content-derived id.

An upload is the raw request body (``curl --data-binary @study.zip``); its kind is read from its first
bytes, never from a client file name (names often hold patient names):

- zip (``PK``): a DICOM series or folder. Refused unless every entry is a plain file or folder with a
  relative name (no ``..``, no absolute path, no symlink, not encrypted), there are at most
  ``max_entries`` entries and at most ``max_unpacked`` bytes in all, counted while extracting (a zip
  header's sizes can lie). Entries are written under numbered names, so no archive name reaches the disk.
- NIfTI (``.nii`` header, or gzip: ``.nii.gz``), M3D ``.npy`` (``\\x93NUMPY``), or one DICOM file.

The study id is the first 32 hex digits of the SHA-256 of the uploaded bytes (of the files, for a
server-side path), so the same bytes give the same id. Each study lives in ``DATA/studies/ID/`` (``input/``,
``meta.json``, ``results/RID/``), created under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from m3d_edge.errors import StudyError
from m3d_edge.fileio import atomic_write_text
from m3d_edge.serve.errors import ApiError

STUDY_ID = re.compile(r"^[0-9a-f]{32}$")
RESULT_ID = re.compile(r"^[0-9a-f]{32}$")
CHUNK = 1 << 20


@dataclass
class StudyEntry:
    study_id: str
    kind: str
    input: Path  # what the pipeline reads (a file or a folder)
    folder: Path  # DATA/studies/ID
    info: dict[str, Any]  # the upload's answer: series chosen and why, geometry

    @property
    def results(self) -> Path:
        return self.folder / "results"


def sniff(head: bytes) -> str | None:
    """The kind of an upload from its first 512 bytes: zip, npy, nii, nii.gz, dicom, or None."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[:2] == b"\x1f\x8b":
        return "nii.gz"
    if (len(head) >= 4 and int.from_bytes(head[:4], "little") in (348, 540)) or head[:4] in (
        (348).to_bytes(4, "big"),
        (540).to_bytes(4, "big"),
    ):
        return "nii"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def _unsafe(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry may not be extracted (None: it may)."""
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in parts:
        return "a '..' path"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    if info.flag_bits & 0x1:
        return "encrypted"
    return None


def extract_zip(src: Path, dest: Path, max_entries: int, max_unpacked: int) -> int:
    """Extract a checked zip flat into ``dest`` (files ``00000 ..``); returns the bytes written."""
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ApiError(422, "bad_archive", f"upload: not a readable zip ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise ApiError(
                422, "unsafe_archive", f"upload: zip has {len(infos)} entries (limit {max_entries})"
            )
        for n, info in enumerate(infos):
            why = _unsafe(info)
            if why:
                raise ApiError(422, "unsafe_archive", f"upload: zip entry {n} is {why}; refused")
        declared = sum(i.file_size for i in infos)
        if declared > max_unpacked:
            raise ApiError(
                422, "unsafe_archive", f"upload: zip unpacks to {declared} bytes (limit {max_unpacked})"
            )
        dest.mkdir(parents=True, exist_ok=True)
        total = 0
        for n, info in enumerate(infos):
            if info.is_dir() or PurePosixPath(info.filename.replace("\\", "/")).name.upper() == "DICOMDIR":
                continue
            try:
                with zf.open(info) as fh, open(dest / f"{n:05d}", "wb") as out:
                    while chunk := fh.read(CHUNK):
                        total += len(chunk)
                        if total > max_unpacked:
                            raise ApiError(
                                422, "unsafe_archive", f"upload: zip unpacks to over {max_unpacked} bytes"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
                raise ApiError(422, "bad_archive", f"upload: zip entry {n} is damaged ({exc})") from None
            except NotImplementedError as exc:  # an unsupported compression method
                raise ApiError(422, "bad_archive", f"upload: zip entry {n}: {exc}") from None
        return total


def check_nifti_size(path: Path, max_bytes: int) -> None:
    """Refuse a NIfTI whose header promises more voxels than ``max_bytes`` of float32 (a .nii.gz bomb)."""
    import nibabel as nib

    try:
        shape = nib.load(str(path)).header.get_data_shape()  # reads the header only
    except Exception:
        return  # unreadable: load_study says why (422 bad_study)
    voxels = 1
    for n in shape:
        voxels *= max(int(n), 1)
    if voxels * 4 > max_bytes:
        raise ApiError(
            422,
            "volume_too_large",
            f"upload: NIfTI of shape {tuple(shape)} is over {max_bytes} bytes as float32",
        )


def hash_path(path: Path) -> str:
    """Content id of a server-side file or folder: SHA-256 over its files' relative names and bytes."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update((f.relative_to(path).as_posix() if f != path else "").encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()[:32]


def describe_study(path: Path) -> dict[str, Any]:
    """Load the study as the pipeline will (raises StudyError) and say what was chosen: series, geometry."""
    from m3d_edge.runtime.imaging import load_study, scan_folder

    candidates = []
    if path.is_dir():
        for s in scan_folder(path):
            candidates.append(
                {
                    "series_instance_uid": s.series_instance_uid,
                    "series_number": s.series_number,
                    "modality": s.modality,
                    "slices": s.n_slices,
                    "orientation": s.orientation,
                    "chosen": s.chosen,
                    "reason": s.reason,
                    "problem": s.problem,
                }
            )
    study = load_study(path)
    g = study.geometry
    real = study.kind in ("dicom", "nifti")
    return {
        "kind": study.kind,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": study.series_instance_uid,
        "series_number": study.series_number,
        "series": candidates,
        "geometry": {
            "shape_zyx": [int(v) for v in g.shape],
            "spacing_zyx_mm": [float(v) for v in g.spacing] if real else None,
            "affine_lps": [[float(v) for v in row] for row in g.affine] if real else None,
        },
        "notes": list(study.notes),
    }


class StudyStore:
    """The studies this server holds, on disk under ``root/studies`` and indexed in memory."""

    def __init__(self, root: Path) -> None:
        self.root = root / "studies"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.entries: dict[str, StudyEntry] = {}
        for meta in self.root.glob("*/meta.json"):  # a --data-dir from an earlier run
            self._read(meta)

    def _read(self, meta: Path) -> StudyEntry | None:
        try:
            d = json.loads(meta.read_text(encoding="utf-8"))
            entry = StudyEntry(d["study_id"], d["kind"], Path(d["input"]), meta.parent, d["info"])
        except (OSError, ValueError, KeyError):
            return None
        self.entries[entry.study_id] = entry
        return entry

    def get(self, study_id: str) -> StudyEntry:
        entry = self.entries.get(study_id) if STUDY_ID.match(study_id) else None
        if entry is not None and not entry.folder.is_dir():  # deleted by another server on this --data-dir
            self.entries.pop(study_id, None)
            entry = None
        if entry is None and STUDY_ID.match(study_id):  # stored by another server (Ray Serve replicas)
            entry = self._read(self.root / study_id / "meta.json")
        if entry is None:
            raise ApiError(404, "unknown_study", f"no study {study_id!r} on this server (upload it first)")
        return entry

    def scratch(self) -> Path:
        """A new private folder for an upload in progress (removed by the caller)."""
        path = self.root / f".incoming-{uuid.uuid4().hex}"
        path.mkdir(mode=0o700)
        return path

    def add(
        self, study_id: str, kind: str, staged: Path, input_rel: str | None, source: Path | None
    ) -> StudyEntry:
        """Describe the staged study and publish it as ``studies/ID`` (``source``: a server-side path)."""
        target = source if source is not None else self.root / study_id / input_rel
        scrub = {str(staged): "upload", str(self.root / study_id): "upload"}
        if source is not None:
            scrub[str(source)] = "study"
        try:
            info = describe_study(staged / input_rel if source is None else source)
        except StudyError as exc:
            from m3d_edge.serve.errors import from_library

            raise from_library(exc, scrub) from None
        atomic_write_text(
            staged / "meta.json",
            json.dumps({"study_id": study_id, "kind": kind, "input": str(target), "info": info}, indent=2),
        )
        final = self.root / study_id
        try:
            os.rename(staged, final)
        except OSError:  # published meanwhile by an identical upload
            shutil.rmtree(staged, ignore_errors=True)
            return self.entries.get(study_id) or self.get(study_id)
        entry = StudyEntry(study_id, kind, target, final, info)
        self.entries[study_id] = entry
        return entry

    def delete(self, study_id: str) -> None:
        entry = self.get(study_id)
        self.entries.pop(study_id, None)
        shutil.rmtree(entry.folder, ignore_errors=True)

    def result_dir(self, entry: StudyEntry) -> tuple[str, Path]:
        rid = uuid.uuid4().hex
        return rid, entry.results / rid


async def receive_body(request: Any, dest: Path, limit: int) -> tuple[str, bytes]:
    """Stream the request body into ``dest`` (at most ``limit`` bytes); returns (study id, first bytes)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, "upload_too_large", f"upload of {declared} bytes is over the limit of {limit} bytes"
        )
    h, n, head = hashlib.sha256(), 0, b""
    with open(dest, "wb") as fh:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise ApiError(413, "upload_too_large", f"upload is over the limit of {limit} bytes")
            if len(head) < 512:
                head += chunk[: 512 - len(head)]
            h.update(chunk)
            fh.write(chunk)
    if n == 0:
        raise ApiError(400, "empty_upload", "the request body is empty; send the study's bytes")
    return h.hexdigest()[:32], head


async def receive_body_json(request: Any, limit: int = 64 * 1024) -> Any:
    """The request body parsed as JSON (at most ``limit`` bytes)."""
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "request_too_large", f"JSON body over {limit} bytes")
    try:
        return json.loads(data)
    except ValueError:
        raise ApiError(400, "bad_request", "the body is not valid JSON") from None
