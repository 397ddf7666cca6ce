"""DICOM folder loading: scan headers, pick a CT series, check its geometry, read and rescale its pixels.

* Headers are read first (``stop_before_pixels``); pixels only for the chosen series.
* Kept: CT Image Storage, Enhanced CT, Legacy Converted Enhanced CT. Dropped: LOCALIZER images,
  DICOMDIR, non-DICOM files and non-image objects (SEG, SR, RTSTRUCT, ...).
* Slices are sorted by position along the slice normal (never InstanceNumber or file name). Duplicate
  positions, gantry tilt, missing slices and uneven spacing are refused with a :class:`StudyError`
  naming the series; with ``allow_resample=True`` missing slices and uneven spacing are resampled onto a
  uniform grid (linear along the normal) instead.
* Rescale slope/intercept per slice, and from the functional groups for multi-frame (Enhanced) CT.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.geometry import Geometry
from m3d_edge.runtime.imaging.study import Study

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
CT_CLASSES = {CT_IMAGE, ENHANCED_CT, LEGACY_ENHANCED_CT}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# transfer syntax -> the importable modules (and their pip names) pydicom needs to decode it
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


@dataclass
class _Frame:
    """One 2D image of a series: a single-frame instance or one frame of a multi-frame instance."""

    file: Path
    sop_uid: str
    frame: int | None  # 1-based frame number for multi-frame instances
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing)
    rows: int
    cols: int
    slope: float
    intercept: float
    thickness: float | None


@dataclass
class SeriesInfo:
    """One series found by :func:`scan_folder`, with why it would or would not be chosen."""

    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    description: str
    modality: str
    sop_class: str  # name of the (first) SOP class
    n_files: int
    n_slices: int  # usable 2D images (frames), localizers excluded
    n_localizers: int
    orientation: str | None  # axial | coronal | sagittal | oblique | None
    eligible: bool
    chosen: bool = False
    reason: str = ""  # why it is (not) chosen
    problem: str | None = None  # geometry problem that would refuse it (None: fine)
    files: list[Path] = field(default_factory=list, repr=False)
    frames: list[_Frame] = field(default_factory=list, repr=False)
    headers: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        num = f"series {self.series_number}" if self.series_number is not None else "series"
        return f"{num} ({self.series_instance_uid})"

    def to_dict(self) -> dict[str, Any]:
        skip = {"files", "frames", "headers"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}


# --------------------------------------------------------------------------------------------- scanning


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _iter_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name.upper() != "DICOMDIR" and not p.name.startswith("."):
            yield p


def _float_list(v: Any) -> np.ndarray | None:
    try:
        arr = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if np.isfinite(arr).all() else None


def _fg_value(ds: Any, index: int, seq: str, attr: str) -> Any:
    """Attribute from the per-frame functional group of frame ``index`` (0-based), else the shared one."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        g = ds.get(groups)
        if g is None or len(g) <= i:
            continue
        item = g[i]
        s = item.get(seq)
        if s is not None and len(s) > 0 and attr in s[0]:
            return s[0][attr].value
    return None


def _is_localizer(image_type: Any) -> bool:
    if image_type is None:
        return False
    vals = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in vals)


def _frames_of(ds: Any, path: Path) -> tuple[list[_Frame], int]:
    """The 2D images of one CT instance, and how many were dropped as localizers."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    sop = str(ds.get("SOPInstanceUID", ""))
    if "NumberOfFrames" in ds and (
        "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    ):
        n = int(ds.NumberOfFrames or 1)
        frames, dropped = [], 0
        for i in range(n):
            ftype = _fg_value(ds, i, "CTImageFrameTypeSequence", "FrameType")
            if _is_localizer(ftype) or (ftype is None and _is_localizer(ds.get("ImageType"))):
                dropped += 1
                continue
            ps = _fg_value(ds, i, "PixelMeasuresSequence", "PixelSpacing")
            ps = _float_list(ps) if ps is not None else None
            thk = _fg_value(ds, i, "PixelMeasuresSequence", "SliceThickness")
            slope = _fg_value(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
            inter = _fg_value(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
            if slope is None:  # some writers keep the rescale at the top level
                slope, inter = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
            ipp = _fg_value(ds, i, "PlanePositionSequence", "ImagePositionPatient")
            iop = _fg_value(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")
            frames.append(
                _Frame(
                    file=path,
                    sop_uid=sop,
                    frame=i + 1,
                    ipp=_float_list(ipp) if ipp is not None else None,
                    iop=_float_list(iop) if iop is not None else None,
                    pixel_spacing=tuple(ps[:2]) if ps is not None and len(ps) >= 2 else None,
                    rows=rows,
                    cols=cols,
                    slope=float(slope if slope is not None else 1),
                    intercept=float(inter if inter is not None else 0),
                    thickness=float(thk) if thk is not None else None,
                )
            )
        return frames, dropped
    if _is_localizer(ds.get("ImageType")):
        return [], 1
    ps = _float_list(ds.get("PixelSpacing")) if "PixelSpacing" in ds else None
    thk = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    frame = _Frame(
        file=path,
        sop_uid=sop,
        frame=None,
        ipp=_float_list(ds.get("ImagePositionPatient")) if "ImagePositionPatient" in ds else None,
        iop=_float_list(ds.get("ImageOrientationPatient")) if "ImageOrientationPatient" in ds else None,
        pixel_spacing=tuple(ps[:2]) if ps is not None and len(ps) >= 2 else None,
        rows=rows,
        cols=cols,
        slope=float(ds.get("RescaleSlope", 1) or 1),
        intercept=float(ds.get("RescaleIntercept", 0) or 0),
        thickness=float(thk) if thk not in (None, "") else None,
    )
    return [frame], 0


def _orientation(iop: np.ndarray | None) -> str | None:
    if iop is None or len(iop) != 6:
        return None
    n = np.cross(iop[:3], iop[3:])
    if np.linalg.norm(n) < 1e-6:
        return None
    n = np.abs(n / np.linalg.norm(n))
    ax = int(np.argmax(n))
    if n[ax] < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[ax]


def _scan(root: Path) -> list[SeriesInfo]:
    groups: dict[tuple[str, str], SeriesInfo] = {}
    for f in _iter_files(root):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (
            InvalidDicomError,
            OSError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            KeyError,
            MemoryError,
        ):
            continue  # not DICOM (or unreadable; an element length beyond any memory): skipped
        meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        sop_class = str(ds.get("SOPClassUID", "") or meta_class)
        if sop_class == MEDIA_STORAGE_DIRECTORY or meta_class == MEDIA_STORAGE_DIRECTORY:
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not series_uid or not sop_class:
            continue
        key = (str(ds.get("StudyInstanceUID", "") or ""), series_uid)
        info = groups.get(key)
        if info is None:
            try:
                num = int(ds.get("SeriesNumber")) if ds.get("SeriesNumber") not in (None, "") else None
            except (TypeError, ValueError):
                num = None
            try:
                class_name = pydicom.uid.UID(sop_class).name
            except Exception:
                class_name = sop_class
            info = groups[key] = SeriesInfo(
                study_instance_uid=key[0],
                series_instance_uid=series_uid,
                series_number=num,
                description=str(ds.get("SeriesDescription", "") or ""),
                modality=str(ds.get("Modality", "") or ""),
                sop_class=class_name,
                n_files=0,
                n_slices=0,
                n_localizers=0,
                orientation=None,
                eligible=False,
            )
        info.n_files += 1
        info.files.append(f)
        if sop_class not in CT_CLASSES:
            continue
        try:
            frames, dropped = _frames_of(ds, f)
        except (TypeError, ValueError, AttributeError, KeyError):
            continue
        info.frames.extend(frames)
        info.n_localizers += dropped
        if frames:
            info.headers.setdefault(str(ds.get("SOPInstanceUID", "")), ds)
    infos = sorted(
        groups.values(),
        key=lambda s: (s.study_instance_uid, s.series_number if s.series_number is not None else 1 << 30),
    )
    for s in infos:
        s.n_slices = len(s.frames)
        s.orientation = _orientation(s.frames[0].iop) if s.frames else None
        if not s.frames and s.n_localizers:
            s.reason = f"only LOCALIZER images ({s.n_localizers}): dropped"
        elif not s.frames:
            s.reason = f"not a CT image series ({s.sop_class}, {s.modality})"
        else:
            s.eligible = True
            try:
                _check_geometry(s.frames, s.name)
            except StudyError as exc:
                s.problem = str(exc)
    return infos


def _select(infos: list[SeriesInfo], series: str | None, where: str) -> SeriesInfo:
    eligible = [s for s in infos if s.eligible]
    if not infos:
        raise StudyError(f"{where}: no DICOM files found")
    if not eligible:
        found = ", ".join(f"{s.name}: {s.reason}" for s in infos)
        raise StudyError(f"{where}: no usable CT image series ({found})")
    if series is None:
        axial = [s for s in eligible if s.orientation == "axial"]
        pool = axial or eligible
        chosen = max(pool, key=lambda s: s.n_slices)  # first of equals (sorted by series number)
        chosen.reason = (
            f"chosen: the {'axial ' if axial else ''}CT series with the most slices ({chosen.n_slices})"
        )
        for s in eligible:
            if s is not chosen:
                s.reason = (
                    f"not chosen: {s.orientation or 'unknown'} series with {s.n_slices} slices; "
                    "select it with series="
                )
    else:
        key = str(series).strip()
        matches = [s for s in eligible if s.series_instance_uid == key]
        how = "SeriesInstanceUID"
        if not matches and key.lstrip("-").isdigit():
            matches = [s for s in eligible if s.series_number == int(key)]
            how = "SeriesNumber"
        if not matches:
            matches = [s for s in eligible if key.lower() in s.description.lower()] if key else []
            how = "description"
        if not matches:
            avail = ", ".join(s.name for s in eligible)
            raise StudyError(f"{where}: no CT series matches {key!r} (available: {avail})")
        if len(matches) > 1:
            names = ", ".join(s.name for s in matches)
            raise StudyError(
                f"{where}: {key!r} matches several series by {how} ({names}); give a SeriesInstanceUID"
            )
        chosen = matches[0]
        chosen.reason = f"chosen: matches {key!r} by {how}"
        for s in eligible:
            if s is not chosen:
                s.reason = f"not chosen: does not match {key!r}"
    chosen.chosen = True
    return chosen


def scan_folder(path: Path | str, series: str | None = None) -> list[SeriesInfo]:
    """List every series under ``path`` (recursively) with why each would or would not be chosen."""
    root = Path(path)
    if not root.exists():
        raise StudyError(f"{root}: no such file or folder")
    infos = _scan(root)
    eligible = [s for s in infos if s.eligible]
    if eligible:
        try:
            _select(infos, series, str(root))
        except StudyError as exc:
            for s in eligible:
                s.reason = f"not chosen: {exc}"
    return infos


# --------------------------------------------------------------------------------------------- geometry


@dataclass
class _Layout:
    frames: list[_Frame]  # sorted ascending along the normal
    positions: np.ndarray  # position of each frame along the normal (mm)
    normal: np.ndarray
    spacing: float  # the regular slice spacing (mm)
    irregular: str | None  # message when missing slices / uneven spacing (resamplable)


def _check_geometry(frames: list[_Frame], name: str) -> _Layout:
    """Sort along the slice normal and refuse what cannot be a regular volume."""
    missing = [f for f in frames if f.ipp is None or f.iop is None or f.pixel_spacing is None]
    if missing:
        raise StudyError(
            f"{name}: {len(missing)} image(s) lack ImagePositionPatient, ImageOrientationPatient or PixelSpacing"
        )
    if any(len(f.ipp) != 3 or len(f.iop) != 6 for f in frames):
        raise StudyError(f"{name}: malformed ImagePositionPatient or ImageOrientationPatient")
    iop0 = frames[0].iop
    if any(not np.allclose(f.iop, iop0, atol=1e-3) for f in frames):
        raise StudyError(f"{name}: images have different orientations (ImageOrientationPatient)")
    if any((f.rows, f.cols) != (frames[0].rows, frames[0].cols) for f in frames):
        raise StudyError(f"{name}: images have different sizes (Rows/Columns)")
    if any(not np.allclose(f.pixel_spacing, frames[0].pixel_spacing, rtol=1e-3) for f in frames):
        raise StudyError(f"{name}: images have different PixelSpacing")
    if min(frames[0].pixel_spacing) <= 0:
        raise StudyError(f"{name}: PixelSpacing must be positive")
    normal = np.cross(iop0[:3], iop0[3:])
    if np.linalg.norm(normal) < 1e-3:
        raise StudyError(f"{name}: ImageOrientationPatient row and column directions are parallel")
    normal = normal / np.linalg.norm(normal)
    pos = np.array([float(f.ipp @ normal) for f in frames])
    order = np.argsort(pos, kind="stable")
    frames = [frames[i] for i in order]
    pos = pos[order]
    if len(frames) == 1:
        thk = frames[0].thickness
        return _Layout(frames, pos, normal, float(thk) if thk and thk > 0 else 1.0, None)

    steps = np.diff(pos)
    dup = np.nonzero(steps < 0.01)[0]
    if len(dup):
        i = int(dup[0])
        raise StudyError(
            f"{name}: duplicate slices: {len(dup) + 1} images share positions along the slice normal "
            f"(first at {pos[i]:.2f} mm)"
        )
    ipps = np.stack([f.ipp for f in frames])
    vec = np.diff(ipps, axis=0)
    along = vec @ normal
    perp = np.linalg.norm(vec - along[:, None] * normal[None, :], axis=1)
    bad = perp > 0.02 + 0.002 * np.abs(along)
    if bad.any():
        angle = math.degrees(math.atan2(float(np.max(perp[bad] / np.abs(along[bad]))), 1.0))
        raise StudyError(
            f"{name}: gantry tilt: slice positions step {angle:.1f} degrees off the slice normal; "
            "tilted series are not supported"
        )
    spacing = float(np.median(steps))
    irregular = None
    tol = max(0.02, 0.01 * spacing)
    if len(steps) >= 2 and np.max(np.abs(steps - spacing)) > tol:
        gaps = np.nonzero(steps > 1.5 * spacing)[0]
        if len(gaps):
            i = int(gaps[0])
            n_missing = int(round(steps[i] / spacing)) - 1
            more = f" (and {len(gaps) - 1} more gaps)" if len(gaps) > 1 else ""
            irregular = (
                f"missing slices: a {steps[i]:.2f} mm gap between slice positions {pos[i]:.2f} and "
                f"{pos[i + 1]:.2f} mm where the spacing is {spacing:.2f} mm (about {n_missing} slices "
                f"missing){more}"
            )
        else:
            irregular = (
                f"non-uniform slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
                f"(median {spacing:.3f} mm)"
            )
    return _Layout(frames, pos, normal, spacing, irregular)


# --------------------------------------------------------------------------------------------- pixels


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


def _read_pixels(path: Path, root: Path) -> tuple[Any, np.ndarray]:
    rel = path.relative_to(root) if root.is_dir() and path.is_relative_to(root) else path
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise StudyError(f"{rel}: cannot read DICOM file ({type(exc).__name__})") from exc
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


def load_dicom(path: Path | str, series: str | None = None, allow_resample: bool = False) -> Study:
    """Load one CT series from a DICOM folder (or a single DICOM file) as a :class:`Study`."""
    root = Path(path)
    if not root.exists():
        raise StudyError(f"{root}: no such file or folder")
    infos = _scan(root)
    info = _select(infos, series, str(root))
    layout = _check_geometry(info.frames, info.name)
    notes: list[str] = []
    if layout.irregular:
        if not allow_resample:
            raise StudyError(f"{info.name}: {layout.irregular}; refused (allow_resample resamples it)")
        notes.append(f"resampled: {layout.irregular}")

    frames = layout.frames
    rows, cols = frames[0].rows, frames[0].cols
    vol = np.empty((len(frames), rows, cols), dtype=np.float32)
    cache: dict[Path, np.ndarray] = {}
    for z, fr in enumerate(frames):
        arr = cache.get(fr.file)
        if arr is None:
            ds, arr = _read_pixels(fr.file, root)
            if fr.frame is not None:
                n = int(ds.get("NumberOfFrames", 1) or 1)
                arr = arr.reshape((n, rows, cols))
                cache = {fr.file: arr}  # keep only the current multi-frame file
        img = arr[fr.frame - 1] if fr.frame is not None else arr
        if img.shape != (rows, cols):
            raise StudyError(f"{fr.file.name}: pixel data of shape {img.shape}, header says {rows}x{cols}")
        vol[z] = img.astype(np.float32) * np.float32(fr.slope) + np.float32(fr.intercept)

    iop = frames[0].iop
    row_sp, col_sp = frames[0].pixel_spacing
    pos = layout.positions
    resampled = bool(layout.irregular)
    if resampled:
        n_new = int(round((pos[-1] - pos[0]) / layout.spacing)) + 1
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
    affine[:3, 3] = frames[0].ipp
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
    )
