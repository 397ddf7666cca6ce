"""DICOM folder loading: scan headers, pick a CT series, check its geometry, read and rescale its pixels.

* Headers are read first (``stop_before_pixels``); pixels only for the chosen series.
* Kept: CT Image Storage, Enhanced CT, Legacy Converted Enhanced CT. Dropped: LOCALIZER images,
  DICOMDIR, non-DICOM files and non-image objects (SEG, SR, RTSTRUCT, ...).
* Slices are sorted by position along the slice normal (never InstanceNumber or file name). Duplicate
  positions, gantry tilt, missing slices and uneven spacing are refused with a :class:`StudyError`
  naming the series; with ``allow_resample=True`` missing slices and uneven spacing are resampled onto a
  uniform grid (linear along the normal) instead.
* Rescale slope/intercept per slice, and from the functional groups for multi-frame (Enhanced) CT.
* Files that cannot be parsed are skipped and named (:attr:`Study.notes`, ``skipped_files``); a series
  left incomplete by them fails its geometry check (missing slices) with a :class:`StudyError`.
* Memory is bounded (:mod:`.limits`): values over 1 MB (bulk private data) are not read, Deflated
  files are inflated in bounded steps to a temporary file, and Rows x Columns x frames x slices is checked
  against the voxel limit before any pixel buffer is allocated.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.dicom_files import (
    DEFER_SIZE,
    readable_copy,
)
from m3d_edge.runtime.imaging.dicom_series import _check_geometry, _first_line, _rel, _scan, _select
from m3d_edge.runtime.imaging.geometry import Geometry
from m3d_edge.runtime.imaging.limits import check_voxels
from m3d_edge.runtime.imaging.study import Study

# transfer syntax -> the importable modules (and their pip names) pydicom needs to decode it. Kept instead of
# pydicom's decoder ``missing_dependencies``: once a plugin is unregistered (or fails to register) pydicom no
# longer lists it, so its message cannot name the pip package to install (tests/test_imaging_dicom.py::
# test_missing_plugin_message: the JPEG 2000 case gives no "pylibjpeg-openjpeg" through the library).
_JPEG = (("pylibjpeg", "pylibjpeg"), ("libjpeg", "pylibjpeg-libjpeg"))
_J2K = (("pylibjpeg", "pylibjpeg"), ("openjpeg", "pylibjpeg-openjpeg"))
_PLUGINS: dict[str, tuple[tuple[str, str], ...]] = {
    "1.2.840.10008.1.2.4.50": _JPEG,
    "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG,
    "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": (("jpeg_ls", "pyjpegls"),),
    "1.2.840.10008.1.2.4.81": (("jpeg_ls", "pyjpegls"),),
    "1.2.840.10008.1.2.4.90": _J2K,
    "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": _J2K,
    "1.2.840.10008.1.2.4.202": _J2K,
    "1.2.840.10008.1.2.4.203": _J2K,
}


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _decode_hint(ts: str) -> str | None:
    needs = _PLUGINS.get(ts)
    if not needs:
        return None
    missing = [pip for mod, pip in needs if not _module_available(mod)]
    if not missing:
        return None
    return "missing decoder plugin: install " + " and ".join(missing)


def _read_pixels(path: Path, root: Path, limit: int | None = None) -> tuple[Any, np.ndarray]:
    with readable_copy(path, limit) as p:
        return _read_pixels_of(p, _rel(path, root))


def _read_pixels_of(path: Path, rel: str) -> tuple[Any, np.ndarray]:
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except Exception as exc:
        raise StudyError(f"{rel}: cannot read DICOM file ({_first_line(exc)})") from exc
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(ts, "name", str(ts))
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise StudyError(f"{rel}: colour images ({ds.get('PhotometricInterpretation')}) are not CT HU")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        hint = _decode_hint(str(ts))
        if hint:
            raise StudyError(f"{rel}: cannot decode {ts_name} pixel data: {hint}") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudyError(f"{rel}: cannot decode {ts_name} pixel data: {first}") from exc
    return ds, np.asarray(arr)


def load_dicom(
    path: Path | str, series: str | None = None, allow_resample: bool = False, max_voxels: int | None = None
) -> Study:
    """Load one CT series from a DICOM folder (or a single DICOM file) as a :class:`Study`.

    ``max_voxels`` overrides the voxel limit of :mod:`.limits`.
    """
    root = Path(path)
    if not root.exists():
        raise StudyError(f"{root}: no such file or folder")
    skipped: list[tuple[str, str]] = []
    infos = _scan(root, skipped, max_voxels)
    notes: list[str] = []
    if skipped:
        names = ", ".join(f"{name} ({why})" for name, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        notes.append(f"skipped {len(skipped)} unreadable file(s): {names}{more}")
    try:
        info = _select(infos, series, str(root))
        layout = _check_geometry(info.frames, info.name)
        if layout.irregular and not allow_resample:
            raise StudyError(
                f"{info.name}: {layout.irregular}; refused (--allow-resample, allow_resample=True in the API, resamples it)"
            )
    except StudyError as exc:
        if skipped:
            raise StudyError(f"{exc} ({notes[0]})") from None
        raise
    check_voxels((len(layout.frames), info.frames[0].rows, info.frames[0].cols), info.name, max_voxels)
    if layout.irregular:
        notes.append(f"resampled: {layout.irregular}")

    frames = layout.frames
    rows, cols = frames[0].rows, frames[0].cols
    if layout.irregular:
        n_new = round((layout.positions[-1] - layout.positions[0]) / layout.spacing) + 1
        check_voxels((n_new, rows, cols), f"{info.name} (resampled)", max_voxels)
    vol = np.empty((len(frames), rows, cols), dtype=np.float32)
    cache: dict[Path, np.ndarray] = {}
    for z, fr in enumerate(frames):
        arr = cache.get(fr.file)
        if arr is None:
            ds, arr = _read_pixels(fr.file, root, max_voxels)
            if fr.frame is not None:
                n = int(ds.get("NumberOfFrames", 1) or 1)
                arr = arr.reshape((n, rows, cols))
                cache = {fr.file: arr}  # keep only the current multi-frame file
        img = arr[fr.frame - 1] if fr.frame is not None else arr
        if img.shape != (rows, cols):
            raise StudyError(f"{fr.file.name}: pixel data of shape {img.shape}, header says {rows}x{cols}")
        vol[z] = img.astype(np.float32) * np.float32(fr.slope) + np.float32(fr.intercept)

    ipp, iop, (row_sp, col_sp) = frames[0].placement()
    pos = layout.positions
    resampled = bool(layout.irregular)
    if resampled:
        n_new = round((pos[-1] - pos[0]) / layout.spacing) + 1
        new_pos = np.linspace(pos[0], pos[-1], n_new)
        j = np.clip(np.searchsorted(pos, new_pos, side="right") - 1, 0, len(pos) - 2)
        w = ((new_pos - pos[j]) / (pos[j + 1] - pos[j])).astype(np.float32)[:, None, None]
        vol = (1.0 - w) * vol[j] + w * vol[j + 1]
        dz = float(new_pos[1] - new_pos[0])
    else:
        dz = float((pos[-1] - pos[0]) / (len(pos) - 1)) if len(pos) > 1 else layout.spacing
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * col_sp
    affine[:3, 1] = iop[3:] * row_sp
    affine[:3, 2] = layout.normal * dz
    affine[:3, 3] = ipp
    geom = Geometry.from_affine(affine, vol.shape)

    datasets, seen = [], set()
    for fr in frames:
        if fr.sop_uid not in seen:
            seen.add(fr.sop_uid)
            datasets.append(info.headers[fr.sop_uid])
    return Study(
        hu=np.ascontiguousarray(vol, dtype=np.float32),
        geometry=geom,
        kind="dicom",
        source_path=root,
        study_instance_uid=info.study_instance_uid,
        series_instance_uid=info.series_instance_uid,
        series_number=info.series_number,
        series_description=info.description,
        source_sop_instance_uids=[] if resampled else [fr.sop_uid for fr in frames],
        source_frame_numbers=[] if resampled else [fr.frame for fr in frames],
        source_datasets=datasets,
        resampled=resampled,
        notes=notes + ([f"{info.n_localizers} LOCALIZER image(s) dropped"] if info.n_localizers else []),
        skipped_files=[name for name, _ in skipped],
    )
