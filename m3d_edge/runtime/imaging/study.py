"""The :class:`Study` a model reads, and :func:`load_study`, the single entry point for every input kind."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from m3d_edge.errors import M3DEdgeError, StudyError
from m3d_edge.runtime.imaging.geometry import LPS_TO_RAS, TARGET_SHAPE, Geometry

_Loader = TypeVar("_Loader", bound=Callable[..., Any])


@dataclass
class Study:
    """One volume ready for preprocessing.

    ``hu`` is float32 in ``(z, y, x)`` order: Hounsfield units, except for ``kind == "npy"``
    (``preprocessed=True``) where it holds M3D's already-normalized ``32x256x256`` values in [0, 1].
    For DICOM, slices are sorted by position along the slice normal (ascending), and
    ``source_sop_instance_uids[z]`` / ``source_frame_numbers[z]`` (1-based, None for single-frame images)
    name the source of slice ``z``; ``source_datasets`` are the header-only datasets of the source instances
    in slice order (one per instance), as a DICOM SEG needs them. No patient identifiers are copied out of
    the datasets into other fields.
    """

    hu: np.ndarray
    geometry: Geometry
    kind: str  # "dicom" | "nifti" | "nrrd" | "metaimage" | "npy"
    source_path: Path
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    source_sop_instance_uids: list[str] = field(default_factory=list)
    source_frame_numbers: list[int | None] = field(default_factory=list)
    source_datasets: list[Any] = field(default_factory=list, repr=False)
    preprocessed: bool = False
    resampled: bool = False
    notes: list[str] = field(default_factory=list)  # warnings: skipped files, dropped localizers, ...
    skipped_files: list[str] = field(default_factory=list)  # unreadable files (relative to the folder)


def _typed_errors(load: _Loader) -> _Loader:
    """The readers' boundary: anything a library raises on a damaged file becomes one StudyError line."""

    @functools.wraps(load)
    def wrapper(path: Path | str, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(path, *args, **kwargs)
        except M3DEdgeError:
            raise
        except MemoryError:
            raise StudyError(
                f"{path}: a declared size does not fit in memory (damaged or huge study)"
            ) from None
        except Exception as exc:  # pydicom/nibabel/numpy errors on damaged input (NotImplementedError, ...)
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise StudyError(f"{path}: unreadable study ({type(exc).__name__}: {first})") from exc

    # wrapper takes and returns what load does (``path`` first, the rest passed on), so it has load's type
    return cast(_Loader, wrapper)


@_typed_errors
def load_study(
    path: Path | str, series: str | None = None, allow_resample: bool = False, max_voxels: int | None = None
) -> Study:
    """Load a DICOM folder (or single DICOM file), a NIfTI, NRRD or MetaImage file, or an M3D ``.npy``.

    ``series`` selects a DICOM series by SeriesInstanceUID, SeriesNumber or a description substring
    (default: the axial CT series with the most slices). ``allow_resample`` lets a DICOM series with
    missing slices or uneven spacing be resampled onto a uniform grid instead of being refused.
    ``max_voxels`` overrides the per-study voxel limit (:mod:`.limits`, ``M3D_EDGE_MAX_VOXELS``).
    """
    path = Path(path)
    if not path.exists():
        raise StudyError(f"{path}: no such file or folder")
    name = path.name.lower()
    if path.is_dir():
        from m3d_edge.runtime.imaging.dicom import load_dicom

        return load_dicom(path, series=series, allow_resample=allow_resample, max_voxels=max_voxels)
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return load_nifti(path, max_voxels=max_voxels)
    if name.endswith(".npy"):
        return load_npy(path)
    if name.endswith((".nrrd", ".nhdr")):
        from m3d_edge.runtime.imaging.nrrd import load_nrrd

        return load_nrrd(path, max_voxels=max_voxels)
    if name.endswith((".mha", ".mhd")):
        from m3d_edge.runtime.imaging.metaimage import load_metaimage

        return load_metaimage(path, max_voxels=max_voxels)
    from m3d_edge.runtime.imaging.dicom import load_dicom
    from m3d_edge.runtime.imaging.dicom_files import is_dicom_file

    if is_dicom_file(path):
        return load_dicom(path, series=series, allow_resample=allow_resample, max_voxels=max_voxels)
    raise StudyError(
        f"{path}: not a DICOM folder or file, NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), "
        "MetaImage (.mha, .mhd) or M3D .npy volume"
    )


def _check_nifti_size(path: Path, img: Any, max_voxels: int | None) -> None:
    """Refuse, before reading any data, a NIfTI whose declared size is over the limit or not in the file."""
    from m3d_edge.runtime.imaging.limits import check_voxels, gzip_payload_size

    shape = tuple(int(s) for s in img.shape)
    check_voxels(shape, str(path), max_voxels)
    hdr = img.header
    itemsize = np.dtype(hdr.get_data_dtype()).itemsize
    need = int(hdr.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * itemsize
    gz = path.name.lower().endswith(".gz")
    have = gzip_payload_size(path, need) if gz else path.stat().st_size
    if have < need:
        raise StudyError(
            f"{path}: truncated NIfTI: the header declares {need:,} bytes of data"
            f"{' (inflated)' if gz else ''}, the file holds {have:,}"
        )


def load_nifti(path: Path | str, max_voxels: int | None = None) -> Study:
    """NIfTI (RAS) -> Study in LPS; the array keeps its stored axis order, read as (x, y, z).

    The declared size is checked against the voxel limit and against the data really in the file
    (counted through the gzip stream in bounded steps) before anything is allocated.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for damaged files
        raise StudyError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    _check_nifti_size(path, img, max_voxels)
    try:
        # nib.load is annotated as the FileBasedImage base; a NIfTI is a SpatialImage (get_fdata, affine)
        data = np.asarray(img.get_fdata(dtype=np.float32))  # type: ignore[attr-defined]
    except Exception as exc:
        raise StudyError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise StudyError(f"{path}: NIfTI has shape {data.shape}; expected a 3D volume")
    affine_ras = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]  # as get_fdata
    if not np.isfinite(affine_ras).all() or abs(np.linalg.det(affine_ras[:3, :3])) < 1e-12:
        raise StudyError(f"{path}: NIfTI affine is singular or not finite")
    if not np.isfinite(data).all():
        raise StudyError(f"{path}: NIfTI contains NaN or infinite values")
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))
    geom = Geometry.from_affine(LPS_TO_RAS @ affine_ras, hu.shape)
    return Study(hu=hu, geometry=geom, kind="nifti", source_path=path)


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
