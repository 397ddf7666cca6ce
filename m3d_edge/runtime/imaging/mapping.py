"""Mapping model outputs (boxes, masks on the model grid) back to the source series.

Box convention (M3D's ``mask2box``): a box ``[d1, h1, w1, d2, h2, w2]`` holds voxel indices of the
32x256x256 model grid divided by the size of that axis: ``d1 = first_index / 32``, ``d2 = last_index / 32``
(the max is the *last* foreground index, so ``d2 <= 31/32``), rounded to 3 decimals. The inverse is
``index = round(value * size)`` clipped to ``[0, size - 1]``.

Resize convention (model grid <-> cropped source grid), ``scale = cropped_size / target_size`` per axis:
a model-grid voxel ``t`` is centred at source coordinate ``(t + 0.5) * scale - 0.5`` (align_corners=False);
a source voxel ``k`` takes the mask value of model voxel ``floor((k + 0.5) / scale)`` (nearest, half-pixel,
the exact inverse of the centre mapping). A box maps to the source voxels whose value would come from inside
the box, so boxes and masks mapped back agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.preprocess import PreprocessRecord
from m3d_edge.runtime.imaging.triples import Float3, Int3, float3


def box_from_mask(mask: np.ndarray, ndigits: int | None = 3) -> list[float] | None:
    """M3D's ``mask2box``: ``[d1,h1,w1,d2,h2,w2]`` = first/last foreground index / axis size (None if empty)."""
    mask = np.asarray(mask)
    if mask.ndim == 4:
        mask = mask[0]
    nz = np.nonzero(mask)
    if len(nz[0]) == 0:
        return None
    lo = [int(a.min()) / s for a, s in zip(nz, mask.shape, strict=True)]
    hi = [int(a.max()) / s for a, s in zip(nz, mask.shape, strict=True)]
    vals = lo + hi
    return [round(v, ndigits) for v in vals] if ndigits is not None else vals


@dataclass(frozen=True)
class SourceBox:
    """A model box mapped back to the source series."""

    normalized: tuple[float, ...]  # [d1,h1,w1,d2,h2,w2] as given
    grid_min: Int3  # inclusive voxel indices on the 32x256x256 grid, (z, y, x)
    grid_max: Int3
    source_min: Int3  # inclusive voxel indices on the source volume, (z, y, x)
    source_max: Int3
    mm_min: Float3  # LPS mm of the centre of voxel source_min
    mm_max: Float3  # LPS mm of the centre of voxel source_max
    mm_center: Float3  # LPS mm, midpoint of mm_min and mm_max

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.__dict__.items()}


def _grid_to_source_range(t_lo: int, t_hi: int, scale: float, size: int) -> tuple[int, int]:
    """Inclusive source range [k_lo, k_hi] of voxels k whose nearest model voxel lies in [t_lo, t_hi]."""
    eps = 1e-9
    k_lo = math.ceil(t_lo * scale - 0.5 - eps)
    k_hi = math.ceil((t_hi + 1) * scale - 0.5 - eps) - 1
    if k_hi < k_lo:  # model voxels finer than the source: take the voxel holding the box centre
        c = math.floor(((t_lo + t_hi) / 2 + 0.5) * scale)
        k_lo = k_hi = c
    return max(0, min(k_lo, size - 1)), max(0, min(k_hi, size - 1))


def box_to_source(box: list[float] | tuple[float, ...], record: PreprocessRecord) -> SourceBox:
    """Map a normalized M3D box through resize and crop to source voxels and LPS millimetres."""
    vals = [float(v) for v in box]
    if len(vals) != 6 or not all(math.isfinite(v) for v in vals):
        raise StudyError(f"box {box!r}: expected 6 finite numbers [d1, h1, w1, d2, h2, w2]")
    target = record.target_shape
    grid_lo: list[int] = []
    grid_hi: list[int] = []
    src_lo: list[int] = []
    src_hi: list[int] = []
    for ax in range(3):
        a = min(max(round(vals[ax] * target[ax]), 0), target[ax] - 1)
        b = min(max(round(vals[ax + 3] * target[ax]), 0), target[ax] - 1)
        a, b = min(a, b), max(a, b)
        grid_lo.append(a)
        grid_hi.append(b)
        c0, c1 = record.crop_start[ax], record.crop_stop[ax]
        k_lo, k_hi = _grid_to_source_range(a, b, (c1 - c0) / target[ax], c1 - c0)
        src_lo.append(k_lo + c0)
        src_hi.append(k_hi + c0)
    from m3d_edge.runtime.imaging.orientation import index_from_model_order

    shape = record.oriented_shape
    corners = [index_from_model_order(c, record.perm, record.flip, shape) for c in (src_lo, src_hi)]
    src_lo = [min(a, b) for a, b in zip(*corners, strict=True)]
    src_hi = [max(a, b) for a, b in zip(*corners, strict=True)]
    geom = record.source_geometry
    p0, p1 = geom.zyx_to_lps(src_lo), geom.zyx_to_lps(src_hi)
    return SourceBox(
        normalized=tuple(vals),
        grid_min=(grid_lo[0], grid_lo[1], grid_lo[2]),
        grid_max=(grid_hi[0], grid_hi[1], grid_hi[2]),
        source_min=(src_lo[0], src_lo[1], src_lo[2]),
        source_max=(src_hi[0], src_hi[1], src_hi[2]),
        mm_min=float3(p0),
        mm_max=float3(p1),
        mm_center=float3((p0 + p1) / 2),
    )


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """For each of n_out source voxels, the model voxel (of n_in) it takes its value from."""
    scale = n_out / n_in  # source voxels per model voxel
    idx = np.floor((np.arange(n_out) + 0.5) / scale + 1e-9).astype(np.int64)
    clipped: np.ndarray = np.clip(idx, 0, n_in - 1)
    return clipped


def mask_to_source(mask: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """Map a model-grid mask ``[32,256,256]`` (or ``[1,32,256,256]``) to the source grid (uint8, 0/1).

    Nearest neighbour through the inverse of resize and crop, then the inverse of the reorientation;
    voxels outside the crop box are 0.
    """
    from m3d_edge.runtime.imaging.orientation import from_model_order

    m = np.asarray(mask)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != tuple(record.target_shape):
        raise StudyError(f"mask of shape {tuple(m.shape)}: expected {tuple(record.target_shape)}")
    m = (m > 0.5) if m.dtype.kind == "f" else (m != 0)
    cropped = [record.crop_stop[a] - record.crop_start[a] for a in range(3)]
    iz, iy, ix = (_nearest_index(cropped[a], record.target_shape[a]) for a in range(3))
    out = np.zeros(record.oriented_shape, dtype=np.uint8)
    out[
        record.crop_start[0] : record.crop_stop[0],
        record.crop_start[1] : record.crop_stop[1],
        record.crop_start[2] : record.crop_stop[2],
    ] = m[np.ix_(iz, iy, ix)]
    return from_model_order(out, record.perm, record.flip) if record.reoriented else out
