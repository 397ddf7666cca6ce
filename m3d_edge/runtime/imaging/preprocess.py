"""M3D preprocessing, torch-free: window -> min-max -> CropForeground -> trilinear resize to 32x256x256.

First the volume is viewed in the model's voxel order (Superior, Posterior, Left; the choice and its
evidence are in :mod:`.orientation`), so the same study stored in any orientation gives the same input.
Then, as the original pipeline: global min-max to [0, 1], MONAI ``CropForeground`` (bounding box of voxels
``> 0``, margin 0), then ``F.interpolate(mode="trilinear", align_corners=False)`` without antialias to
``(32, 256, 256)``. Every step is recorded in a JSON-serialisable
:class:`PreprocessRecord` so model outputs can be mapped back (see :mod:`.geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.geometry import TARGET_SHAPE, Geometry
from m3d_edge.runtime.imaging.orientation import canonical_axes, to_model_order
from m3d_edge.runtime.imaging.triples import Bool3, Float3, Int3, bool3, float3, int3

if TYPE_CHECKING:  # pragma: no cover
    from m3d_edge.runtime.imaging.study import Study

#: Fewer voxels than this along any axis is not a volume (a single 2D slice would be stretched 32x along z).
#: M3D's model grid is 32 slices deep with 4-slice patches; 8 slices is a 4x stretch at most.
MIN_SLICES = 8

#: name -> (low, high) HU clip bounds. "m3d" clips to the 12-bit CT range so padding values (-2000, -3024)
#: do not change the scaling; the others are (level - width/2, level + width/2).
WINDOWS: dict[str, tuple[float, float]] = {
    "m3d": (-1024.0, 3071.0),
    "abdomen": (40.0 - 200.0, 40.0 + 200.0),
    "lung": (-600.0 - 750.0, -600.0 + 750.0),
    "bone": (400.0 - 900.0, 400.0 + 900.0),
    "brain": (40.0 - 40.0, 40.0 + 40.0),
}


@dataclass
class PreprocessRecord:
    """What preprocessing did, enough to map model-grid boxes and masks back to the source volume.

    ``crop_start``, ``crop_stop`` and ``zoom`` are on the source volume viewed in model order
    (``to_model_order(source, perm, flip)``, shape :attr:`oriented_shape`); ``perm``/``flip`` are the
    identity for a study already stored in that order.
    """

    source_shape: Int3  # (z, y, x) of the source volume as stored
    crop_start: Int3  # inclusive, on the model-order view of the source
    crop_stop: Int3  # exclusive, on the model-order view of the source
    target_shape: Int3  # (32, 256, 256)
    zoom: Float3  # target / cropped size per (model-order) axis
    source_geometry: Geometry
    window: str = "m3d"
    clip: tuple[float, float] | None = None  # HU clip bounds applied (None: identity record)
    value_range: tuple[float, float] | None = None  # min/max after clipping, mapped to 0 and 1
    identity: bool = False  # True for already-preprocessed (M3D .npy) input
    notes: list[str] = field(default_factory=list)
    perm: Int3 = (0, 1, 2)  # model axis a is stored axis perm[a] ...
    flip: Bool3 = (False, False, False)  # ... reversed when flip[a]

    @property
    def oriented_shape(self) -> Int3:
        """Shape of the source volume viewed in model order."""
        return int3(self.source_shape[p] for p in self.perm)

    @property
    def reoriented(self) -> bool:
        return tuple(self.perm) != (0, 1, 2) or any(self.flip)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_shape": list(self.source_shape),
            "crop_start": list(self.crop_start),
            "crop_stop": list(self.crop_stop),
            "target_shape": list(self.target_shape),
            "zoom": list(self.zoom),
            "source_geometry": self.source_geometry.to_dict(),
            "window": self.window,
            "clip": list(self.clip) if self.clip is not None else None,
            "value_range": list(self.value_range) if self.value_range is not None else None,
            "identity": self.identity,
            "notes": list(self.notes),
            "orientation": {"perm": list(self.perm), "flip": list(self.flip)},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessRecord:
        return cls(
            source_shape=int3(d["source_shape"]),
            crop_start=int3(d["crop_start"]),
            crop_stop=int3(d["crop_stop"]),
            target_shape=int3(d["target_shape"]),
            zoom=float3(d["zoom"]),
            source_geometry=Geometry.from_dict(d["source_geometry"]),
            window=d.get("window", "m3d"),
            clip=tuple(d["clip"]) if d.get("clip") is not None else None,
            value_range=tuple(d["value_range"]) if d.get("value_range") is not None else None,
            identity=bool(d.get("identity", False)),
            notes=list(d.get("notes", [])),
            perm=int3(d.get("orientation", {}).get("perm", (0, 1, 2))),
            flip=bool3(d.get("orientation", {}).get("flip", (False,) * 3)),
        )


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's linear interpolation, align_corners=False, size given."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return i0, i1, lam


def resize_linear_axis(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    n_in = a.shape[axis]
    if n_in == n_out:
        return a
    i0, i1, lam = _linear_weights(n_in, n_out)
    shape = [1] * a.ndim
    shape[axis] = n_out
    lam = lam.reshape(shape).astype(a.dtype)
    lo = np.take(a, i0, axis=axis)
    resized: np.ndarray = lo + (np.take(a, i1, axis=axis) - lo) * lam
    return resized


def resize_trilinear(volume: np.ndarray, shape: tuple[int, int, int] = TARGET_SHAPE) -> np.ndarray:
    """``F.interpolate(v[None,None], size=shape, mode="trilinear", align_corners=False)`` in numpy.

    Separable: one linear pass per axis (float32, like torch), the most shrinking axis first.
    """
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim != 3:
        raise StudyError(f"volume of shape {v.shape}: expected 3 dimensions (z, y, x)")
    order = sorted(range(3), key=lambda ax: shape[ax] / v.shape[ax])
    for ax in order:
        v = resize_linear_axis(v, int(shape[ax]), ax)
    return np.ascontiguousarray(v, dtype=np.float32)


def crop_foreground_box(volume: np.ndarray) -> tuple[Int3, Int3]:
    """MONAI ``CropForeground`` box (``x > 0``, margin 0): (start, stop) per axis, stop exclusive."""
    fg = volume > 0
    start: list[int] = []
    stop: list[int] = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.nonzero(fg.any(axis=other))[0]
        if len(idx) == 0:
            raise StudyError("volume has no foreground after normalization (it is constant)")
        start.append(int(idx[0]))
        stop.append(int(idx[-1]) + 1)
    return (start[0], start[1], start[2]), (stop[0], stop[1], stop[2])


def normalize(
    hu: np.ndarray, window: str = "m3d"
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Clip to the window, then global min-max to [0, 1] (float32)."""
    if window not in WINDOWS:
        raise StudyError(f"unknown window preset {window!r} (choose from {', '.join(WINDOWS)})")
    lo, hi = WINDOWS[window]
    v = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    vmin, vmax = float(v.min()), float(v.max())
    if not vmax > vmin:
        raise StudyError(f"volume is constant ({vmin:g}) inside the {window!r} window; nothing to see")
    return (v - vmin) / (vmax - vmin), (lo, hi), (vmin, vmax)


def preprocess(
    study: Study | np.ndarray, window: str = "m3d", geometry: Geometry | None = None
) -> tuple[np.ndarray, PreprocessRecord]:
    """HU volume (or a :class:`Study`) -> (``[1, 32, 256, 256]`` float32 in [0, 1], :class:`PreprocessRecord`).

    A study loaded from an M3D ``.npy`` (``preprocessed=True``) is passed through with an identity record.
    """
    if isinstance(study, np.ndarray):
        hu, where = study, "volume"
        geometry = geometry or Geometry.identity(hu.shape)
        preprocessed = False
    else:
        hu, geometry, preprocessed = study.hu, study.geometry, study.preprocessed
        where = str(study.source_path)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise StudyError(f"volume of shape {hu.shape}: expected a non-empty (z, y, x) volume")
    if not np.isfinite(hu).all():
        raise StudyError("volume contains NaN or infinite values")
    if preprocessed:
        if tuple(hu.shape) != TARGET_SHAPE:
            raise StudyError(f"preprocessed volume of shape {hu.shape}: expected {TARGET_SHAPE}")
        rec = PreprocessRecord(
            source_shape=TARGET_SHAPE,
            crop_start=(0, 0, 0),
            crop_stop=TARGET_SHAPE,
            target_shape=TARGET_SHAPE,
            zoom=(1.0, 1.0, 1.0),
            source_geometry=geometry,
            window="none",
            identity=True,
        )
        return np.ascontiguousarray(hu, dtype=np.float32)[None], rec

    if min(hu.shape) < MIN_SLICES:
        raise StudyError(
            f"{where}: shape {tuple(hu.shape)} is too thin to be a volume (at least {MIN_SLICES} voxels along "
            f"every axis; the model reads {TARGET_SHAPE[0]}x{TARGET_SHAPE[1]}x{TARGET_SHAPE[2]})"
        )
    can = canonical_axes(geometry.affine, hu.shape)
    norm, clip, vrange = normalize(to_model_order(hu, can.perm, can.flip), window)
    start, stop = crop_foreground_box(norm)
    cropped = norm[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    out = resize_trilinear(cropped, TARGET_SHAPE)
    rec = PreprocessRecord(
        source_shape=int3(hu.shape),
        crop_start=start,
        crop_stop=stop,
        target_shape=TARGET_SHAPE,
        zoom=float3(t / c for t, c in zip(TARGET_SHAPE, cropped.shape, strict=True)),
        source_geometry=geometry,
        window=window,
        clip=clip,
        value_range=vrange,
        perm=can.perm,
        flip=can.flip,
    )
    if rec.reoriented:
        rec.notes.append(
            f"reoriented to the model's voxel order (S, P, L): axes {can.perm}, flips {can.flip}"
        )
    return out[None], rec
