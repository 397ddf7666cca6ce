"""Voxel geometry of a volume, and the model grid (the lowest imaging layer: it imports no other).

Conventions (used everywhere in :mod:`m3d_edge.runtime.imaging`):

* Volumes are numpy arrays in ``(z, y, x)`` = (slice, row, column) order.
* :attr:`Geometry.affine` is a 4x4 matrix mapping a voxel index written as ``(x, y, z, 1)`` =
  (column, row, slice, 1) to patient coordinates in millimetres, **LPS** (DICOM patient system).
  Its first column is the row direction cosine times the column spacing, the second the column direction
  cosine times the row spacing, the third the step between consecutive slices, the fourth the centre of the
  first voxel. :meth:`Geometry.zyx_to_lps` takes indices in array order and does the swap for you.
* :attr:`Geometry.spacing` and :attr:`Geometry.shape` are in array order ``(z, y, x)``.
* NIfTI files are RAS; conversion is ``affine_ras = diag(-1, -1, 1, 1) @ affine_lps`` (and back).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3d_edge.runtime.imaging.triples import Float3, Int3, float3, int3

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TARGET_SHAPE = (32, 256, 256)


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a ``(z, y, x)`` volume are in patient space (LPS, mm)."""

    affine: np.ndarray  # 4x4, (x=column, y=row, z=slice, 1) -> LPS mm
    shape: Int3  # (z, y, x)
    spacing: Float3  # (z, y, x) mm

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: tuple[int, ...]) -> Geometry:
        affine = np.asarray(affine, dtype=np.float64).reshape(4, 4)
        norms = np.linalg.norm(affine[:3, :3], axis=0)  # x, y, z
        return cls(
            affine=affine,
            shape=int3(shape),
            spacing=(float(norms[2]), float(norms[1]), float(norms[0])),
        )

    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> Geometry:
        return cls.from_affine(np.eye(4), shape)

    @property
    def affine_ras(self) -> np.ndarray:
        ras: np.ndarray = LPS_TO_RAS @ self.affine
        return ras

    def zyx_to_lps(self, zyx: np.ndarray | Sequence[float]) -> np.ndarray:
        """Map voxel indices given in array order ``(..., 3)`` = (z, y, x) to LPS millimetres."""
        p = np.asarray(zyx, dtype=np.float64)
        xyz1 = np.concatenate([p[..., ::-1], np.ones((*p.shape[:-1], 1))], axis=-1)
        lps: np.ndarray = (xyz1 @ self.affine.T)[..., :3]
        return lps

    def to_dict(self) -> dict[str, Any]:
        return {
            "affine_lps": [[float(v) for v in row] for row in self.affine],
            "shape_zyx": list(self.shape),
            "spacing_zyx_mm": list(self.spacing),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(
            affine=np.asarray(d["affine_lps"], dtype=np.float64),
            shape=int3(d["shape_zyx"]),
            spacing=float3(d["spacing_zyx_mm"]),
        )


# --------------------------------------------------------------------------------------------- boxes


# --------------------------------------------------------------------------------------------- masks
