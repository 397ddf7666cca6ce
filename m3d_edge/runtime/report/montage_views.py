"""What a montage shows, before any drawing: the volume, mask and box on one grid (:class:`Scene`), the
region they cover, and the 2D views through it (axial slices, possibly zoomed, a coronal and a sagittal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.geometry import TARGET_SHAPE, Geometry
from m3d_edge.runtime.imaging.mapping import box_to_source, mask_to_source
from m3d_edge.runtime.report.orientation import Canonical
from m3d_edge.runtime.result import identity_record

if TYPE_CHECKING:
    from m3d_edge.runtime.imaging.preprocess import PreprocessRecord
    from m3d_edge.runtime.result import Result

PANEL = 280  # the largest patient extent of the volume fills this many pixels
MAX_AXIAL = 6
ZOOM_MIN_MM = 60.0  # smallest field of view of a zoomed axial view
ZOOM_CONTEXT = 2.5  # zoomed field of view = this times the region's in-plane size (at least ZOOM_MIN_MM)
ZOOM_BELOW = 0.7  # zoom only when that field of view is below this fraction of the slice
SOFT_TISSUE = (40.0 - 200.0, 40.0 + 200.0)  # W400 / L40

Voxel = tuple[int, int, int]
VoxelBox = tuple[Voxel, Voxel]  # inclusive (z, y, x) voxel range
Crop = tuple[int, int, int, int]  # (row0, col0, rows, cols) of a 2D slice


@dataclass
class Scene:
    """The result on the grid it is drawn on: the source grid when known, else the model grid."""

    volume: NDArray[np.floating[Any]]  # (z, y, x)
    geometry: Geometry
    window: tuple[float, float]
    window_label: str
    mask: NDArray[np.bool_] | None  # (z, y, x)
    box: VoxelBox | None
    grid: str
    notes: list[str]


@dataclass
class View:
    """One 2D image of the montage, in display orientation, before drawing."""

    view: str  # "axial" | "coronal" | "sagittal"
    ct: NDArray[np.floating[Any]]  # the full 2D slice
    mask: NDArray[np.bool_] | None
    box_rows: tuple[int, int] | None  # inclusive box range along the slice rows, when the slice cuts the box
    box_cols: tuple[int, int] | None
    spacing: tuple[float, float]  # (row, column) mm
    index: int  # canonical slice index along the view normal
    crop: Crop
    mm_per_px: float


def _has_source(study: object, record: PreprocessRecord | None) -> bool:
    hu = getattr(study, "hu", None)
    return (
        record is not None
        and hu is not None
        and getattr(study, "geometry", None) is not None
        and tuple(np.shape(hu)) == tuple(record.source_shape)
    )


def scene(result: Result) -> Scene:
    """The result's volume, mask and box on the source grid when it carries its study, else the model grid."""
    notes: list[str] = []
    study, record = result.study, result.record
    if study is not None and record is not None and _has_source(study, record):
        volume = np.asarray(study.hu)
        geometry = record.source_geometry
        normalized = bool(getattr(study, "preprocessed", False) or record.identity)
        window, wlabel = ((0.0, 1.0), "0..1") if normalized else (SOFT_TISSUE, "W400 L40")
        grid = "source"
    else:
        record = identity_record()
        geometry = record.source_geometry
        if result.volume is not None:
            volume = np.asarray(result.volume, dtype=np.float32).reshape(TARGET_SHAPE)
        else:
            volume = np.zeros(TARGET_SHAPE, np.float32)
            notes.append("no image volume in the result; outlines drawn on black")
        window, wlabel, grid = (0.0, 1.0), "0..1", "model"
    mask = None
    if result.mask is not None:
        mask = mask_to_source(result.mask, record).astype(bool)
    box = None
    if result.box is not None:
        try:
            sb = box_to_source(result.box, record)
            box = (sb.source_min, sb.source_max)
        except StudyError as exc:
            notes.append(f"box not drawn: {exc}")
    return Scene(volume, geometry, window, wlabel, mask, box, grid, notes)


def _bbox(mask: NDArray[np.bool_]) -> VoxelBox | None:
    lo, hi = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        if len(idx) == 0:
            return None
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
    return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])


def region(shape: Voxel, box: VoxelBox | None, mask: NDArray[np.bool_] | None) -> VoxelBox:
    """The canonical voxel range covering the box and the mask (the whole volume when neither maps)."""
    regions = [] if box is None else [box]
    if mask is not None:
        mb = _bbox(mask)
        if mb is not None:
            regions.append(mb)
    if not regions:  # an empty mask and a box that could not be mapped
        regions.append(((0, 0, 0), (shape[0] - 1, shape[1] - 1, shape[2] - 1)))
    lo = [min(r[0][c] for r in regions) for c in range(3)]
    hi = [max(r[1][c] for r in regions) for c in range(3)]
    return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])


def centre_of(reg: VoxelBox) -> Voxel:
    lo, hi = reg
    return (lo[0] + hi[0]) // 2, (lo[1] + hi[1]) // 2, (lo[2] + hi[2]) // 2


def full_mm_per_px(can: Canonical) -> float:
    """Millimetres per display pixel so that the largest patient extent fills a panel."""
    return max(can.shape[c] * can.spacing[c] for c in range(3)) / PANEL


def axial_crop(can: Canonical, reg: VoxelBox, centre: Voxel) -> tuple[Crop, float]:
    """(crop, mm/px) of the axial views: zoomed onto the region when it is small against the field of view."""
    _, n1, n2 = can.shape
    sp = can.spacing
    reg_mm = max((reg[1][c] - reg[0][c] + 1) * sp[c] for c in (1, 2))
    fov = max(ZOOM_MIN_MM, ZOOM_CONTEXT * reg_mm)
    if fov >= ZOOM_BELOW * max(n1 * sp[1], n2 * sp[2]):
        return (0, 0, n1, n2), full_mm_per_px(can)
    nr, nc = min(n1, int(np.ceil(fov / sp[1]))), min(n2, int(np.ceil(fov / sp[2])))
    r0 = min(max(centre[1] - nr // 2, 0), n1 - nr)
    c0 = min(max(centre[2] - nc // 2, 0), n2 - nc)
    return (r0, c0, nr, nc), max(nr * sp[1], nc * sp[2]) / PANEL


def _slices(reg: VoxelBox) -> list[int]:
    lo, hi = reg[0][0], reg[1][0]
    n = min(MAX_AXIAL, hi - lo + 1)
    return sorted({round(float(v)) for v in np.linspace(lo, hi, n)}, reverse=True)  # superior first


def _in(box: VoxelBox | None, axis: int, k: int) -> VoxelBox | None:
    """The box when the slice ``k`` along ``axis`` cuts it."""
    return box if box is not None and box[0][axis] <= k <= box[1][axis] else None


def axial_views(
    can: Canonical,
    vol: NDArray[np.floating[Any]],
    msk: NDArray[np.bool_] | None,
    box: VoxelBox | None,
    reg: VoxelBox,
    crop: tuple[Crop, float],
) -> list[View]:
    """Up to :data:`MAX_AXIAL` axial slices through the region, superior first."""
    out = []
    for k in _slices(reg):
        b = _in(box, 0, k)
        out.append(
            View(
                "axial",
                vol[k],
                None if msk is None else msk[k],
                None if b is None else (b[0][1], b[1][1]),
                None if b is None else (b[0][2], b[1][2]),
                (can.spacing[1], can.spacing[2]),
                k,
                crop[0],
                crop[1],
            )
        )
    return out


def reformat_views(
    can: Canonical,
    vol: NDArray[np.floating[Any]],
    msk: NDArray[np.bool_] | None,
    box: VoxelBox | None,
    centre: Voxel,
) -> list[View]:
    """The coronal and sagittal reformats through the region's centre (superior at the top)."""
    n0, n1, n2 = can.shape
    sp, mpp = can.spacing, full_mm_per_px(can)
    j, i = centre[1], centre[2]
    cor, sag = _in(box, 1, j), _in(box, 2, i)
    return [
        View(
            "coronal",
            vol[::-1, j, :],
            None if msk is None else msk[::-1, j, :],
            None if cor is None else (n0 - 1 - cor[1][0], n0 - 1 - cor[0][0]),
            None if cor is None else (cor[0][2], cor[1][2]),
            (sp[0], sp[2]),
            j,
            (0, 0, n0, n2),
            mpp,
        ),
        View(
            "sagittal",
            vol[::-1, :, i],
            None if msk is None else msk[::-1, :, i],
            None if sag is None else (n0 - 1 - sag[1][0], n0 - 1 - sag[0][0]),
            None if sag is None else (sag[0][1], sag[1][1]),
            (sp[0], sp[1]),
            i,
            (0, 0, n0, n1),
            mpp,
        ),
    ]
