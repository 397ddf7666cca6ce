"""Imaging I/O for the runtime, in one-way layers (each imports only those above it):

geometry, orientation, triples, limits, seg_codes -> study -> dicom_files, dicom_series -> readers (dicom,
nifti, npy, nrrd, metaimage) -> load (``load_study``) -> preprocess -> mapping (boxes and masks back to the
source) -> writers (mask_writers: NIfTI and DICOM SEG; sr: DICOM SR). ``pyproject.toml`` checks the order.

Torch-free by rule: nothing here imports torch or transformers.
"""

from typing import Any

from m3d_edge.runtime.imaging.geometry import Geometry
from m3d_edge.runtime.imaging.load import load_study
from m3d_edge.runtime.imaging.mapping import SourceBox, box_from_mask, box_to_source, mask_to_source
from m3d_edge.runtime.imaging.mask_writers import write_dicom_seg, write_nifti_mask
from m3d_edge.runtime.imaging.preprocess import WINDOWS, PreprocessRecord, preprocess, resize_trilinear
from m3d_edge.runtime.imaging.study import Study

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
