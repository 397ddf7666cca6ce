"""NRRD volumes (``.nrrd``, ``.nhdr`` + data file) through pynrrd, with sizes checked before reading.

pynrrd (pure Python, numpy only) is the reader Slicer's and pyradiomics' users rely on. Before it reads
any data, the declared ``sizes`` are checked against the voxel limit and, for raw and gzip encodings,
against the data really in the file (the gzip stream is counted in bounded steps), so neither a short file
nor a small file that inflates to more than it declares makes us allocate. A detached data file must lie
in the header's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.geometry import Geometry
from m3d_edge.runtime.imaging.limits import check_voxels
from m3d_edge.runtime.imaging.study import Study

#: NRRD ``space`` -> sign of each axis to turn it into LPS
_SPACES = {
    "left-posterior-superior": (1, 1, 1),
    "lps": (1, 1, 1),
    "right-anterior-superior": (-1, -1, 1),
    "ras": (-1, -1, 1),
    "left-anterior-superior": (1, -1, 1),
    "las": (1, -1, 1),
}


def _data_offset(path: Path) -> int:
    """Byte offset of the data of an attached NRRD: just after the blank line that ends the header."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    for sep in (b"\n\n", b"\r\n\r\n"):
        i = head.find(sep)
        if i >= 0:
            return i + len(sep)
    raise StudyError(f"{path}: NRRD header has no end (no blank line in the first MB)")


def _check_data(path: Path, header: dict[str, Any], n_voxels: int) -> None:
    from m3d_edge.runtime.imaging.limits import _inflate

    dtype = _dtype(path, header)
    if dtype is None:
        return  # an unknown pynrrd version: the voxel limit still bounds the read
    need = n_voxels * np.dtype(dtype).itemsize
    detached = header.get("data file") or header.get("datafile")
    if detached:
        data_path = (path.parent / str(detached)).resolve()
        if not data_path.is_relative_to(path.parent.resolve()) or not data_path.is_file():
            raise StudyError(f"{path}: data file {detached!r} is not a file in the header's folder")
        offset = int(header.get("byte skip", 0) or 0)
    else:
        data_path, offset = path, _data_offset(path)
    encoding = str(header.get("encoding", "raw")).lower()
    if encoding == "raw":
        have = data_path.stat().st_size - max(offset, 0)
    elif encoding in ("gzip", "gz"):
        with open(data_path, "rb") as fh:
            fh.seek(offset)
            have = _inflate(fh, 31, need, keep=False)[0]
    else:
        return  # text or bzip2: the voxel limit bounds them
    if have < need:
        raise StudyError(
            f"{path}: truncated NRRD: the header declares {need:,} bytes of data, it holds {have:,}"
        )
    if encoding != "raw" and have > need:
        raise StudyError(f"{path}: NRRD data inflates to more than the {need:,} bytes its header declares")


def _dtype(path: Path, header: dict[str, Any]) -> np.dtype | None:
    import nrrd

    determine = getattr(getattr(nrrd, "reader", None), "_determine_datatype", None)
    if determine is None:
        return None
    try:
        dtype: np.dtype = determine(header)  # pynrrd's private helper, unannotated
        return dtype
    except Exception as exc:
        raise StudyError(f"{path}: NRRD type {header.get('type')!r} is not supported ({exc})") from None


def load_nrrd(path: Path | str, max_voxels: int | None = None) -> Study:
    """NRRD -> :class:`Study` in LPS; stored order (x, y, z) read as (z, y, x) like NIfTI."""
    import nrrd

    path = Path(path)
    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:  # pynrrd raises NRRDError, ValueError, ... for damaged headers
        raise StudyError(f"{path}: cannot read NRRD header ({type(exc).__name__}: {exc})") from None
    sizes = [int(s) for s in header.get("sizes", [])]
    while len(sizes) > 3 and sizes[-1] == 1:
        sizes = sizes[:-1]
    if len(sizes) != 3:
        raise StudyError(f"{path}: NRRD of sizes {list(header.get('sizes', []))}; expected a 3D volume")
    n = check_voxels(sizes, str(path), max_voxels)
    _check_data(path, header, n)
    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:
        raise StudyError(f"{path}: cannot read NRRD data ({type(exc).__name__}: {exc})") from None
    data = np.asarray(data).reshape(sizes)  # (x, y, z)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if "space directions" in header and space not in _SPACES:
        raise StudyError(f"{path}: NRRD space {space!r} is not a patient space (LPS, RAS or LAS)")
    sign = np.asarray(_SPACES.get(space, (1, 1, 1)), dtype=np.float64)
    if "space directions" in header:
        dirs = np.asarray(header["space directions"], dtype=np.float64)[-3:, :3]  # one row per axis
    else:
        dirs = np.diag([float(s) for s in header.get("spacings", (1.0, 1.0, 1.0))[:3]])
    origin = np.asarray(header.get("space origin", (0.0, 0.0, 0.0)), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = (dirs * sign[None, :]).T  # columns: x, y, z axis vectors in LPS
    affine[:3, 3] = origin * sign
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise StudyError(f"{path}: NRRD space directions are singular or not finite")
    hu = np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32)
    if not np.isfinite(hu).all():
        raise StudyError(f"{path}: NRRD contains NaN or infinite values")
    notes = [] if "space directions" in header else ["NRRD has no space directions: axes assumed LPS"]
    return Study(
        hu=hu, geometry=Geometry.from_affine(affine, hu.shape), kind="nrrd", source_path=path, notes=notes
    )
