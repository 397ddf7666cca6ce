"""Voxel geometry, and mapping model outputs (boxes, masks) back to the source series.

Conventions (used everywhere in :mod:`m3d_edge.runtime.imaging`):

* Volumes are numpy arrays in ``(z, y, x)`` = (slice, row, column) order.
* :attr:`Geometry.affine` is a 4x4 matrix mapping a voxel index written as ``(x, y, z, 1)`` =
  (column, row, slice, 1) to patient coordinates in millimetres, **LPS** (DICOM patient system).
  Its first column is the row direction cosine times the column spacing, the second the column direction
  cosine times the row spacing, the third the step between consecutive slices, the fourth the centre of the
  first voxel. :meth:`Geometry.zyx_to_lps` takes indices in array order and does the swap for you.
* :attr:`Geometry.spacing` and :attr:`Geometry.shape` are in array order ``(z, y, x)``.
* NIfTI files are RAS; conversion is ``affine_ras = diag(-1, -1, 1, 1) @ affine_lps`` (and back).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m3d_edge.errors import StudyError
from m3d_edge.fileio import atomic_path
from m3d_edge.runtime.imaging.triples import Float3, Int3, float3, int3

if TYPE_CHECKING:  # pragma: no cover
    from m3d_edge.runtime.imaging.preprocess import PreprocessRecord
    from m3d_edge.runtime.imaging.study import Study

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

    @property
    def slice_normal(self) -> np.ndarray:
        n = np.cross(self.affine[:3, 0], self.affine[:3, 1])
        unit: np.ndarray = n / np.linalg.norm(n)
        return unit

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


# --------------------------------------------------------------------------------------------- masks


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


def write_nifti_mask(mask: np.ndarray, geometry: Geometry, path: Path | str) -> Path:
    """Write a source-grid ``(z, y, x)`` mask as uint8 NIfTI with the source affine (RAS), atomically."""
    import nibabel as nib

    path = Path(path)
    m = np.asarray(mask)
    if tuple(m.shape) != tuple(geometry.shape):
        raise StudyError(
            f"{path.name}: mask shape {tuple(m.shape)} does not match the source {geometry.shape}"
        )
    data = np.ascontiguousarray((m != 0).astype(np.uint8).transpose(2, 1, 0))  # -> (x, y, z)
    # nibabel's Nifti1Image and its header methods carry no annotations
    img = nib.Nifti1Image(data, geometry.affine_ras)  # type: ignore[no-untyped-call]
    img.set_sform(geometry.affine_ras, code=1)  # type: ignore[no-untyped-call]
    img.set_qform(geometry.affine_ras, code=1)  # type: ignore[no-untyped-call]
    img.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_path(path) as tmp:
        real_tmp = tmp.with_name(tmp.name + suffix)  # nibabel picks compression from the suffix
        try:
            nib.save(img, str(real_tmp))
            real_tmp.replace(tmp)
        finally:
            if real_tmp.exists():
                real_tmp.unlink()
    return path


#: Type 2 patient/study attributes highdicom copies from the source: they must be present, may be empty
TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
)


def with_type2_attributes(ds: Any) -> Any:
    """``ds`` itself when every Type 2 source attribute is present, else a copy with the absent ones empty.

    De-identification tools often drop them; the standard allows them empty (zero length) in the SEG.
    """
    missing = [k for k in TYPE2_SOURCE_ATTRIBUTES if k not in ds]
    if not missing:
        return ds
    import copy

    ds = copy.deepcopy(ds)
    for k in missing:
        setattr(ds, k, "")
    return ds


def write_dicom_seg(
    mask: np.ndarray,
    study: Study,
    path: Path | str,
    label: str,
    bundle_id: str,
    bundle_version: str,
    series_number: int = 901,
) -> Path:
    """Write a source-grid ``(z, y, x)`` mask as a BINARY DICOM Segmentation referencing the source series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from m3d_edge.runtime.imaging.seg_codes import segment_coding

    path = Path(path)
    name = f"series {study.series_number}" if study.series_number is not None else str(study.source_path)
    if study.kind != "dicom" or not study.source_datasets:
        raise StudyError(f"{name}: a DICOM SEG needs a DICOM source series (this study is {study.kind})")
    if study.resampled:
        raise StudyError(f"{name}: the series was resampled onto a uniform grid; a SEG cannot reference it")
    m = (np.asarray(mask) != 0).astype(np.uint8)
    if tuple(m.shape) != tuple(study.geometry.shape):
        raise StudyError(
            f"{name}: mask shape {tuple(m.shape)} does not match the series {study.geometry.shape}"
        )

    multiframe = "NumberOfFrames" in study.source_datasets[0] and len(study.source_datasets) == 1
    if multiframe:
        # pixel_array must follow the frame order of the single multi-frame source image
        frames = np.zeros((int(study.source_datasets[0].NumberOfFrames), *m.shape[1:]), np.uint8)
        for z, fn in enumerate(study.source_frame_numbers):
            if fn is None:
                raise StudyError(f"{name}: slice {z} has no frame number in its multi-frame source")
            frames[int(fn) - 1] = m[z]
        pixel_array = frames
    elif len(study.source_datasets) == m.shape[0]:
        pixel_array = m
    else:
        raise StudyError(f"{name}: SEG output for series of several multi-frame instances is not supported")

    label = (" ".join(str(label).split()) or "segment").replace("\\", "/")[:64]
    coding = segment_coding(label)
    algo = hd.AlgorithmIdentificationSequence(
        name=str(bundle_id)[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=str(bundle_version)[:64],
    )
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=coding.category,
        segmented_property_type=coding.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo,
        anatomic_regions=[coding.region] if coding.region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*coding.rgb),
    )
    if coding.laterality is not None:
        desc.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(coding.laterality)]
    try:
        seg = hd.seg.Segmentation(
            source_images=[with_type2_attributes(ds) for ds in study.source_datasets],
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[desc],
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="m3d-edge",
            manufacturer_model_name=str(bundle_id)[:64],
            software_versions=str(bundle_version)[:64],
            device_serial_number="0",
            series_description="M3D segmentation",
            omit_empty_frames=bool(m.any()),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise StudyError(f"{name}: cannot build a DICOM SEG: {exc}") from exc
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path
