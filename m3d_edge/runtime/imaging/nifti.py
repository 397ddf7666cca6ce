"""NIfTI (.nii, .nii.gz) studies, RAS on disk, LPS in the :class:`Study`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.geometry import LPS_TO_RAS, Geometry
from m3d_edge.runtime.imaging.study import Study


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
