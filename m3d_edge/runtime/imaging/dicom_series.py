"""DICOM series from headers: the frames of single- and multi-frame CT instances, grouping into series,
the choice of one series with its reasons (``--series``), and the geometry check of the chosen one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.dicom_files import (
    _iter_files,
    is_dicom_file,
    read_header,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
CT_CLASSES = {CT_IMAGE, ENHANCED_CT, LEGACY_ENHANCED_CT}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


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

    def placement(self) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """``(ipp, iop, pixel_spacing)`` of a frame known to have all three (:func:`_check_geometry`)."""
        assert self.ipp is not None and self.iop is not None and self.pixel_spacing is not None
        return self.ipp, self.iop, self.pixel_spacing


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
    irregular: str | None = None  # missing slices / uneven spacing: refused unless resampled on request
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if root.is_dir() and path.is_relative_to(root) else path.name


def _scan(
    root: Path, skipped: list[tuple[str, str]] | None = None, limit: int | None = None
) -> list[SeriesInfo]:
    """Group the DICOM files under ``root`` by series; files that cannot be parsed go to ``skipped``.

    ``skipped`` receives ``(file relative to root, reason)`` for every file that looks like DICOM (a
    ``DICM`` preamble or a ``.dcm`` name) but cannot be read; other non-DICOM files are ignored.
    """
    skip = skipped if skipped is not None else []
    groups: dict[tuple[str, str], SeriesInfo] = {}
    for f in _iter_files(root):
        ds = _header_or_skip(f, root, limit, skip)
        if ds is None:
            continue
        meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        sop_class = str(ds.get("SOPClassUID", "") or meta_class)
        if MEDIA_STORAGE_DIRECTORY in (sop_class, meta_class):
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not series_uid or not sop_class:
            if _looks_like_dicom(f):
                skip.append((_rel(f, root), "damaged header: no SOPClassUID or SeriesInstanceUID"))
            continue
        key = (str(ds.get("StudyInstanceUID", "") or ""), series_uid)
        if key not in groups:
            groups[key] = _new_series(ds, key, sop_class)
        info = groups[key]
        info.n_files += 1
        info.files.append(f)
        if sop_class in CT_CLASSES:
            _add_frames(info, ds, f, root, skip)
    infos = sorted(
        groups.values(),
        key=lambda s: (s.study_instance_uid, s.series_number if s.series_number is not None else 1 << 30),
    )
    for s in infos:
        _judge(s)
    return infos


def _looks_like_dicom(f: Path) -> bool:
    return is_dicom_file(f) or f.suffix.lower() == ".dcm"


def _header_or_skip(f: Path, root: Path, limit: int | None, skip: list[tuple[str, str]]) -> Any:
    """The file's header, or None (an unreadable DICOM file is listed in ``skip``; others are ignored)."""
    try:
        return read_header(f, limit)
    except StudyError:
        raise  # over a size limit: refused, naming the file
    except InvalidDicomError as exc:
        if _looks_like_dicom(f):
            skip.append((_rel(f, root), _first_line(exc)))
        return None  # not DICOM: ignored
    except Exception as exc:  # pydicom raises many types for damaged files
        skip.append((_rel(f, root), _first_line(exc)))
        return None


def _new_series(ds: Any, key: tuple[str, str], sop_class: str) -> SeriesInfo:
    try:
        num = int(ds.get("SeriesNumber")) if ds.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        num = None
    try:
        class_name = pydicom.uid.UID(sop_class).name
    except Exception:
        class_name = sop_class
    return SeriesInfo(
        study_instance_uid=key[0],
        series_instance_uid=key[1],
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


def _add_frames(info: SeriesInfo, ds: Any, f: Path, root: Path, skip: list[tuple[str, str]]) -> None:
    try:
        frames, dropped = _frames_of(ds, f)
    except Exception as exc:  # damaged or odd values in the header
        skip.append((_rel(f, root), _first_line(exc)))
        return
    info.frames.extend(frames)
    info.n_localizers += dropped
    if frames:
        info.headers.setdefault(str(ds.get("SOPInstanceUID", "")), ds)


def _judge(s: SeriesInfo) -> None:
    """Slice count, orientation, and whether (or why not) the series can be used."""
    s.n_slices = len(s.frames)
    s.orientation = _orientation(s.frames[0].iop) if s.frames else None
    if not s.frames and s.n_localizers:
        s.reason = f"only LOCALIZER images ({s.n_localizers}): dropped"
    elif not s.frames:
        s.reason = f"not a CT image series ({s.sop_class}, {s.modality})"
    else:
        s.eligible = True
        try:
            s.irregular = _check_geometry(s.frames, s.name).irregular
        except StudyError as exc:
            s.problem = str(exc)


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
                    "select it with --series (series= in the API)"
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


def scan_folder(
    path: Path | str, series: str | None = None, skipped: list[tuple[str, str]] | None = None
) -> list[SeriesInfo]:
    """List every series under ``path`` (recursively) with why each would or would not be chosen.

    Unreadable files are appended to ``skipped`` as ``(file, reason)``.
    """
    root = Path(path)
    if not root.exists():
        raise StudyError(f"{root}: no such file or folder")
    infos = _scan(root, skipped)
    eligible = [s for s in infos if s.eligible]
    if eligible:
        try:
            _select(infos, series, str(root))
        except StudyError as exc:
            for s in eligible:
                s.reason = f"not chosen: {exc}"
    return infos


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
    placed = [f.placement() for f in frames]  # (ipp, iop, pixel_spacing), in frame order
    if any(len(ipp) != 3 or len(iop) != 6 for ipp, iop, _ in placed):
        raise StudyError(f"{name}: malformed ImagePositionPatient or ImageOrientationPatient")
    iop0, spacing0 = placed[0][1], placed[0][2]
    if any(not np.allclose(iop, iop0, atol=1e-3) for _, iop, _ in placed):
        raise StudyError(f"{name}: images have different orientations (ImageOrientationPatient)")
    if any((f.rows, f.cols) != (frames[0].rows, frames[0].cols) for f in frames):
        raise StudyError(f"{name}: images have different sizes (Rows/Columns)")
    if any(not np.allclose(ps, spacing0, rtol=1e-3) for _, _, ps in placed):
        raise StudyError(f"{name}: images have different PixelSpacing")
    if min(spacing0) <= 0:
        raise StudyError(f"{name}: PixelSpacing must be positive")
    normal = np.cross(iop0[:3], iop0[3:])
    if np.linalg.norm(normal) < 1e-3:
        raise StudyError(f"{name}: ImageOrientationPatient row and column directions are parallel")
    normal = normal / np.linalg.norm(normal)
    pos = np.array([float(ipp @ normal) for ipp, _, _ in placed])
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
    ipps = np.stack([f.placement()[0] for f in frames])
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
            n_missing = round(steps[i] / spacing) - 1
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
