"""Imaging I/O for the runtime: load studies (DICOM, NIfTI, M3D .npy), preprocess, map outputs back.

Torch-free by rule: nothing here imports torch or transformers.
"""

from typing import Any

from m3d_edge.runtime.imaging.geometry import (
    Geometry,
    SourceBox,
    box_from_mask,
    box_to_source,
    mask_to_source,
    write_dicom_seg,
    write_nifti_mask,
)
from m3d_edge.runtime.imaging.preprocess import WINDOWS, PreprocessRecord, preprocess, resize_trilinear
from m3d_edge.runtime.imaging.study import Study, load_study

__all__ = [
    "WINDOWS",
    "Geometry",
    "PreprocessRecord",
    "SourceBox",
    "Study",
    "box_from_mask",
    "box_to_source",
    "load_study",
    "mask_to_source",
    "preprocess",
    "resize_trilinear",
    "scan_folder",
    "write_dicom_seg",
    "write_nifti_mask",
]


def __getattr__(name: str) -> Any:
    if name in ("scan_folder", "SeriesInfo"):
        from m3d_edge.runtime.imaging import dicom_series as dicom

        return getattr(dicom, name)
    raise AttributeError(name)
