"""One entry point for every input kind: :func:`load_study` picks the reader by path, and turns any
library error on a damaged file into one :class:`~m3d_edge.errors.StudyError` line."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from m3d_edge.errors import M3DEdgeError, StudyError
from m3d_edge.runtime.imaging.study import Study

_Loader = TypeVar("_Loader", bound=Callable[..., Any])


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
        from m3d_edge.runtime.imaging.nifti import load_nifti

        return load_nifti(path, max_voxels=max_voxels)
    if name.endswith(".npy"):
        from m3d_edge.runtime.imaging.npy import load_npy

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
