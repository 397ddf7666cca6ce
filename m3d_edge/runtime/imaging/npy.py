"""M3D's own ``.npy`` volumes: already preprocessed 1x32x256x256 (or 32x256x256) values in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.geometry import TARGET_SHAPE, Geometry
from m3d_edge.runtime.imaging.study import Study


def load_npy(path: Path | str) -> Study:
    """M3D ``.npy``: ``1x32x256x256`` (or ``32x256x256``) float, already normalized to [0, 1]."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise StudyError(f"{path}: cannot read .npy ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if tuple(arr.shape) != TARGET_SHAPE:
        raise StudyError(f"{path}: array of shape {arr.shape}; expected 1x32x256x256 or 32x256x256")
    if arr.dtype.kind not in "fiu":
        raise StudyError(f"{path}: array of dtype {arr.dtype}; expected a float volume")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise StudyError(f"{path}: array contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise StudyError(
            f"{path}: values span [{lo:g}, {hi:g}]; an M3D .npy must already be normalized to [0, 1]"
        )
    return Study(
        hu=np.ascontiguousarray(arr),
        geometry=Geometry.identity(TARGET_SHAPE),
        kind="npy",
        source_path=path,
        preprocessed=True,
    )
