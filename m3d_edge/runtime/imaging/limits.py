"""How much a study may cost: one voxel limit per study, checked on declared sizes before allocating.

Headers and compressed data must not decide how much memory the runtime takes. Every reader checks the
sizes a file *declares* (NIfTI header shape, DICOM Rows x Columns x frames x slices, NRRD/MetaImage sizes)
against :func:`max_voxels` before it allocates, checks that the data is really there (a header may claim
400 MB in a 101-byte file), and inflates compressed data in bounded steps. A refusal is a
:class:`~m3d_edge.errors.StudyError` (exit 3) naming the file.

The limit is ``M3D_EDGE_MAX_VOXELS`` (default 134,217,728 = 512 x 512 x 512 voxels; a study of that size
peaks at roughly 2 GB through loading and preprocessing, about 16 bytes per voxel), or the
``max_voxels=`` argument of :func:`~m3d_edge.runtime.imaging.load_study`.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import BinaryIO

from m3d_edge.errors import StudyError

DEFAULT_MAX_VOXELS = 512 * 512 * 512
ENV_MAX_VOXELS = "M3D_EDGE_MAX_VOXELS"
#: headers, private data and the like a single DICOM file may hold on top of its pixels (inflated)
HEADER_ALLOWANCE_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 20


def max_voxels(value: int | None = None) -> int:
    """The voxel limit: ``value`` if given, else ``M3D_EDGE_MAX_VOXELS``, else the default."""
    if value is not None:
        v = int(value)
    else:
        raw = os.environ.get(ENV_MAX_VOXELS, "").strip()
        try:
            v = int(raw) if raw else DEFAULT_MAX_VOXELS
        except ValueError:
            raise StudyError(f"{ENV_MAX_VOXELS}={raw!r}: expected a whole number of voxels") from None
    if v < 1:
        raise StudyError(f"voxel limit {v}: must be at least 1")
    return v


def check_voxels(shape: tuple[int, ...] | list[int], where: str, limit: int | None = None) -> int:
    """Refuse a declared shape with more voxels than the limit; returns the voxel count."""
    if any(int(s) < 0 for s in shape):
        raise StudyError(f"{where}: declared size {tuple(shape)} has a negative dimension")
    n = 1
    for s in shape:
        n *= int(s)
    lim = max_voxels(limit)
    if n > lim:
        dims = " x ".join(str(int(s)) for s in shape)
        raise StudyError(
            f"{where}: declares {dims} = {n:,} voxels, over the limit of {lim:,} per study "
            f"(set {ENV_MAX_VOXELS} to raise it)"
        )
    return n


def _inflate(fp: BinaryIO, wbits: int, stop_after: int, keep: bool) -> tuple[int, bytes]:
    """Inflate ``fp`` in bounded steps until its end or past ``stop_after`` bytes; gzip members chain."""
    d = zlib.decompressobj(wbits)
    out, total, pending = bytearray(), 0, b""
    while total <= stop_after:
        if not pending:
            pending = fp.read(_CHUNK)
            if not pending:
                break
        piece = d.decompress(pending, _CHUNK)
        total += len(piece)
        if keep:
            out += piece
        pending = d.unconsumed_tail
        if d.eof:
            pending = d.unused_data
            if wbits != 31 or not pending.startswith(b"\x1f\x8b"):
                break
            d = zlib.decompressobj(wbits)  # the next gzip member (bgzip and the like)
    return total, bytes(out)


def bounded_inflate(fp: BinaryIO, max_bytes: int, where: str, wbits: int = -zlib.MAX_WBITS) -> bytes:
    """Inflate the rest of ``fp`` (raw deflate by default, ``wbits=31`` for gzip) to at most ``max_bytes``."""
    try:
        total, data = _inflate(fp, wbits, max_bytes, keep=True)
    except zlib.error as exc:
        raise StudyError(f"{where}: corrupt compressed data ({exc})") from None
    if total > max_bytes:
        raise StudyError(
            f"{where}: compressed data inflates to more than {max_bytes / 2**20:.0f} MB; refused "
            f"(set {ENV_MAX_VOXELS} to raise the limit)"
        )
    return data


def gzip_payload_size(path: Path, stop_after: int) -> int:
    """Bytes a gzip file inflates to, counted in bounded steps (nothing kept), stopping past ``stop_after``."""
    try:
        with open(path, "rb") as fh:
            return _inflate(fh, 31, stop_after, keep=False)[0]
    except (OSError, zlib.error) as exc:
        raise StudyError(f"{path}: corrupt gzip data ({type(exc).__name__}: {exc})") from None
