"""Voxel order: the one order the model reads, and radiological display orientation (pure numpy).

**Model order.** Every study is fed to the model with its array axes ``(D, H, W)`` pointing
(Superior, Posterior, Left): slices from feet to head, rows from the front of the patient to the back,
columns from the patient's right to left (an axial image in radiological display convention, patient
Right on the image left, Anterior at the top). :func:`canonical_axes` picks the permutation and flips
of the stored ``(z, y, x)`` array closest to that order (no resampling, an oblique series keeps its
obliquity); :mod:`.preprocess` applies it first and records it, and boxes and masks are mapped back
through its exact inverse onto the stored grid. An axial head-first DICOM series sorted along its slice
normal is already in this order, as are ITK/SimpleITK-written NIfTI and NRRD ("left-posterior-superior"
space) files; a RAS-stored NIfTI (``nib.as_closest_canonical``) is flipped in-plane.

Evidence from M3D's code (``BAAI-DCAI/M3D``), as no file states the order outright:

* Segmentation, positioning (``Data/process/m3d_seg_data_preprocess.py`` then ``m3d_seg_data_prepare.py``):
  MONAI ``LoadImaged`` keeps the NIfTI's stored ``(i, j, k)`` order (``Orientationd(..., "RAS")`` is
  commented out) and ``np.swapaxes(image, -1, -3)`` makes ``(D, H, W) = (k, j, i)``; the public CT sets
  (MSD, BTCV, KiTS, ...) are mostly written from DICOM by ITK-based tools, which keep DICOM's stored order
  ``i -> L, j -> P, k -> S``. That is (S, P, L). ``m3d_refseg_data_prepare.py`` uses
  ``transpose(2, 0, 1)``, ``(k, i, j)``: the in-plane transpose of the same volumes.
* Captions and VQA (``m3d_cap_data_prepare.py``, the bulk of the training data): 2D display images
  (radiological convention: Anterior at the top, patient Right on the left) stacked as
  ``(D, H, W)``: H -> P, W -> L, as above; the slice order is the file order of the source case.
* Training (``LaMed/src/dataset/multi_dataset.py``) augments with ``RandRotate90(spatial_axes=(1, 2))``
  with probability 0.5 and ``RandFlip`` on each axis with probability 0.1: the model has seen in-plane
  rotations and flips, but most of its data in the order above. The D direction is the least certain
  (file order of the caption cases is not recorded); (S, P, L) keeps DICOM's native ascending order.

**Display.** A volume ``(z, y, x)`` with a :class:`~m3d_edge.runtime.imaging.geometry.Geometry` is shown
through the same *canonical view*. Then, in radiological convention:

* axial   ``C[k]``             rows A->P, columns R->L   (patient Right on image left, Anterior at top)
* coronal ``C[:, j, :][::-1]`` rows S->I, columns R->L
* sagittal ``C[:, :, i][::-1]`` rows S->I, columns A->P

The letters shown at each image edge are computed from the patient direction of that edge
(:func:`direction_letters`), not assumed, so an oblique series gets e.g. ``"RA"`` and an error in the
reorientation would show as wrong letters instead of silently wrong images.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from m3d_edge.runtime.imaging.triples import Bool3, Float3, Int3, bool3, float3, int3

#: LPS component -> (letter of the positive direction, letter of the negative direction)
_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))
#: canonical display axis c points along this LPS component (positive direction)
_CANONICAL_LPS = (2, 1, 0)  # axis 0 -> S, axis 1 -> P, axis 2 -> L
VIEWS = ("axial", "coronal", "sagittal")


def direction_letters(vec: np.ndarray | Sequence[float], threshold: float = 0.3) -> str:
    """Letters naming an LPS direction, strongest first: ``(1,0,0)`` -> ``"L"``, ``(-.8,.6,0)`` -> ``"RP"``.

    Components whose share of the unit vector is below ``threshold`` are left out (at least one letter).
    """
    v = np.asarray(vec, dtype=np.float64).reshape(3)
    n = float(np.linalg.norm(v))
    if not n > 0:
        raise ValueError("direction of zero length")
    v = v / n
    order = sorted(range(3), key=lambda i: -abs(v[i]))
    letters = []
    for rank, i in enumerate(order):
        if rank == 0 or abs(v[i]) >= threshold:
            letters.append(_LETTERS[i][0] if v[i] > 0 else _LETTERS[i][1])
    return "".join(letters)


@dataclass(frozen=True)
class Canonical:
    """How to view a ``(z, y, x)`` array in canonical (S, P, L) order.

    ``perm[c]`` is the array axis shown as canonical axis ``c``; ``flip[c]`` whether it is reversed;
    ``directions[c]`` the LPS unit vector canonical axis ``c`` points along; ``spacing[c]`` its mm step.
    """

    perm: Int3
    flip: Bool3
    directions: np.ndarray  # [3, 3]: row c = LPS direction of canonical axis c
    spacing: Float3
    shape: Int3  # canonical shape

    def view(self, array: np.ndarray) -> np.ndarray:
        """The canonical view (a numpy view, no copy) of a ``(z, y, x)`` array."""
        a = np.transpose(array, self.perm)
        idx = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        return a[idx]

    def to_canonical(self, c: int, lo: int, hi: int) -> tuple[int, int]:
        """Inclusive range ``[lo, hi]`` on array axis ``perm[c]`` -> inclusive range on canonical axis c."""
        n = self.shape[c]
        return (n - 1 - hi, n - 1 - lo) if self.flip[c] else (lo, hi)

    def to_source(self, canonical_index: Int3) -> Int3:
        """A canonical ``(c0, c1, c2)`` voxel index -> the array's ``(z, y, x)`` index."""
        out = [0, 0, 0]
        for c in range(3):
            k = int(canonical_index[c])
            out[self.perm[c]] = self.shape[c] - 1 - k if self.flip[c] else k
        return out[0], out[1], out[2]

    def box_to_canonical(self, lo_zyx: Int3, hi_zyx: Int3) -> tuple[Int3, Int3]:
        """An inclusive ``(z, y, x)`` box -> the same box as inclusive canonical ranges."""
        lo, hi = [0, 0, 0], [0, 0, 0]
        for c in range(3):
            a = self.perm[c]
            lo[c], hi[c] = self.to_canonical(c, int(lo_zyx[a]), int(hi_zyx[a]))
        return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])

    def view_directions(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        """LPS unit vectors of (image right, image down) for a view."""
        d = self.directions
        if view == "axial":
            return d[2], d[1]
        if view == "coronal":
            return d[2], -d[0]
        if view == "sagittal":
            return d[1], -d[0]
        raise ValueError(f"unknown view {view!r} (choose from {', '.join(VIEWS)})")

    def letters(self, view: str) -> dict[str, str]:
        """Orientation letters at the ``left``, ``right``, ``top`` and ``bottom`` edges of a view."""
        right, down = self.view_directions(view)
        return {
            "left": direction_letters(-right),
            "right": direction_letters(right),
            "top": direction_letters(-down),
            "bottom": direction_letters(down),
        }


def canonical_axes(affine: np.ndarray, shape: Int3) -> Canonical:
    """Pick the permutation and flips of a ``(z, y, x)`` array that best align it with (S, P, L).

    ``affine`` maps ``(x, y, z, 1)`` voxel indices to LPS mm (the :class:`Geometry` convention).
    """
    affine = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    cols = affine[:3, :3]
    # row a = LPS direction of array axis a (z, y, x) = affine columns 2, 1, 0
    raw = np.stack([cols[:, 2], cols[:, 1], cols[:, 0]])
    norms = np.linalg.norm(raw, axis=1)
    if not np.all(norms > 0):
        raise ValueError("affine has an axis of zero length")
    dirs = raw / norms[:, None]
    best: tuple[int, ...] = (0, 1, 2)
    best_score = -1.0
    for perm in itertools.permutations(range(3)):
        score = sum(abs(dirs[perm[c], _CANONICAL_LPS[c]]) for c in range(3))
        if score > best_score + 1e-9:
            best, best_score = perm, score
    flip = bool3(dirs[best[c], _CANONICAL_LPS[c]] < 0 for c in range(3))
    directions = np.stack([dirs[best[c]] * (-1.0 if flip[c] else 1.0) for c in range(3)])
    return Canonical(
        perm=int3(best),
        flip=flip,
        directions=directions,
        spacing=float3(norms[best[c]] for c in range(3)),
        shape=int3(shape[best[c]] for c in range(3)),
    )


def orientation_letters(affine: np.ndarray, shape: Int3 = (1, 1, 1)) -> dict[str, dict[str, str]]:
    """Letters per view (``axial``, ``coronal``, ``sagittal``): ``{left, right, top, bottom}`` as shown."""
    can = canonical_axes(affine, shape)
    return {v: can.letters(v) for v in VIEWS}


# --------------------------------------------------------------------------------------------- model order


def to_model_order(array: np.ndarray, perm: tuple[int, ...], flip: tuple[bool, ...]) -> np.ndarray:
    """A stored ``(z, y, x)`` array viewed in model order (no copy): axes permuted by ``perm``, then flipped."""
    a = np.transpose(array, tuple(perm))
    return a[tuple(slice(None, None, -1) if f else slice(None) for f in flip)]


def from_model_order(array: np.ndarray, perm: tuple[int, ...], flip: tuple[bool, ...]) -> np.ndarray:
    """The exact inverse of :func:`to_model_order` (a contiguous copy in stored order)."""
    a = array[tuple(slice(None, None, -1) if f else slice(None) for f in flip)]
    return np.ascontiguousarray(np.transpose(a, tuple(int(i) for i in np.argsort(perm))))


def index_from_model_order(
    index: Sequence[int], perm: tuple[int, ...], flip: tuple[bool, ...], model_shape: tuple[int, ...]
) -> Int3:
    """A voxel index of the model-order view -> the same voxel's stored ``(z, y, x)`` index."""
    out = [0, 0, 0]
    for c in range(3):
        k = int(index[c])
        out[perm[c]] = int(model_shape[c]) - 1 - k if flip[c] else k
    return out[0], out[1], out[2]
