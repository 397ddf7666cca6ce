"""The :class:`Study` a model reads: one volume, its geometry and where it came from (readers fill it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.runtime.imaging.geometry import Geometry


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
