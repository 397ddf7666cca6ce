"""Reading DICOM files within our memory bound: the DICM check, bounded inflation of Deflated files,
headers without large values, and the pixel-length check (see :mod:`.limits`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.misc import is_dicom

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.limits import ENV_MAX_VOXELS, HEADER_ALLOWANCE_BYTES, check_voxels, max_voxels

DEFER_SIZE = "1 MB"  # larger values (bulk private data, big pixel data) are read only when used
_COPY_CHUNK = 1 << 20


def is_dicom_file(path: Path) -> bool:
    """A Part 10 file (preamble + ``DICM``), by pydicom's own check; unreadable paths are not DICOM."""
    try:
        return bool(is_dicom(path))
    except OSError:
        return False


@contextlib.contextmanager
def readable_copy(path: Path, limit: int | None = None) -> Iterator[Path]:
    """``path`` itself, or for a Deflated file a temporary inflated copy (bounded steps, bounded size).

    pydicom inflates a Deflated data set into memory whole (a 531 KB file with a 512 MB private tag took
    2.2 GB); the inflated copy on disk lets it defer large values like any other file.
    """
    import zlib

    from pydicom.filebase import DicomFileLike
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    with open(path, "rb") as fh:
        try:
            read_preamble(fh, False)
            meta = _read_file_meta_info(fh)
        except Exception:  # not a Part 10 file (or a damaged one): pydicom's own reader decides
            meta = None
        if meta is None or meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            yield path
            return
        cap = HEADER_ALLOWANCE_BYTES + 4 * max_voxels(limit)
        with tempfile.TemporaryDirectory(prefix="m3d-edge-inflate-") as tmp:
            out_path = Path(tmp) / "inflated.dcm"
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            d, written = zlib.decompressobj(-zlib.MAX_WBITS), 0
            with open(out_path, "wb") as out:
                out.write(b"\0" * 128 + b"DICM")
                write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
                pending = b""
                while True:
                    if not pending:
                        pending = fh.read(_COPY_CHUNK)
                        if not pending:
                            break
                    try:
                        piece = d.decompress(pending, _COPY_CHUNK)
                    except zlib.error as exc:
                        raise StudyError(f"{path}: corrupt Deflated data ({exc})") from None
                    written += len(piece)
                    if written > cap:
                        raise StudyError(
                            f"{path}: Deflated data set inflates to more than {cap / 2**20:.0f} MB; refused "
                            f"(set {ENV_MAX_VOXELS} to raise the limit)"
                        )
                    out.write(piece)
                    pending = d.unconsumed_tail
                    if d.eof:
                        break
            yield out_path


def read_header(path: Path, limit: int | None = None) -> Any:
    """The data set of ``path`` without pixel data and without values over 1 MB (read lazily if used).

    Raises ``ValueError`` when uncompressed pixel data is shorter than Rows x Columns x frames declare
    (a truncated copy among good slices).
    """
    with readable_copy(path, limit) as p, open(p, "rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=DEFER_SIZE)
        if "Rows" in ds and "Columns" in ds:  # a refusal (exit 3), not a skipped file
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            check_voxels((frames, int(ds.Rows or 0), int(ds.Columns or 0)), str(path), limit)
        _check_pixel_length(ds, fh.tell(), os.fstat(fh.fileno()).st_size)
    return ds


def _check_pixel_length(ds: Any, pixel_at: int, size: int) -> None:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or ts.is_compressed or "Rows" not in ds or pixel_at >= size:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    need = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
    have = size - pixel_at - (8 if ts.is_implicit_VR else 12)
    if have < need:
        raise ValueError(f"pixel data truncated: {have:,} of {need:,} bytes")


def _iter_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name.upper() != "DICOMDIR" and not p.name.startswith("."):
            yield p
