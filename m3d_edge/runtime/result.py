"""The answer to one question: text, tokens, box, mask, timings, provenance; JSON-serialisable.

:meth:`Result.to_dict` is the versioned, documented JSON schema (``docs/result-schema.md``). It carries
study and series UIDs but never patient names, IDs or source paths (folder names often hold them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m3d_edge import __version__

if TYPE_CHECKING:  # pragma: no cover
    from m3d_edge.runtime.imaging.preprocess import PreprocessRecord
    from m3d_edge.runtime.imaging.study import Study

RESULT_SCHEMA = "m3d-edge/result/1"


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass
class Result:
    question: str
    task: str | None
    text: str
    tokens: list[int]
    stop_reason: str
    box: tuple[float, ...] | None  # normalised [d1, h1, w1, d2, h2, w2] on the model grid
    mask: np.ndarray | None  # bool [D, H, W] on the model grid
    timings: dict[str, Any]
    provenance: dict[str, Any]
    volume: np.ndarray | None = None  # the model input [D, H, W] in [0, 1] (for previews)
    study: Study | None = None  # the loaded study, when the input was a file
    record: PreprocessRecord | None = None  # its preprocessing/geometry record
    outputs: dict[str, str] = field(default_factory=dict)  # written files (mask NIfTI, DICOM SEG, ...)
    target: str | None = None  # the task argument (segment label), when known
    notes: list[str] = field(default_factory=list)  # warnings met while writing outputs
    source_mask_voxels: int | None = None  # foreground voxels of the mask on the source grid, once mapped
    prompt: dict[str, Any] = field(default_factory=dict)  # format ("demo"/"train"), separator, tokens

    # -- parts of the schema -----------------------------------------------------------------------
    def study_dict(self) -> dict[str, Any]:
        """Identity of the input without patient identifiers: UIDs, kind and grid only."""
        s, rec = self.study, self.record
        d: dict[str, Any] = {
            "kind": getattr(s, "kind", None) or "array",
            "study_instance_uid": getattr(s, "study_instance_uid", None),
            "series_instance_uid": getattr(s, "series_instance_uid", None),
            "series_number": getattr(s, "series_number", None),
            "shape_zyx": None,
            "spacing_zyx_mm": None,
            "resampled": bool(getattr(s, "resampled", False)),
            "skipped_files": list(getattr(s, "skipped_files", None) or []),
            "notes": list(getattr(s, "notes", None) or []),
        }
        geom = getattr(s, "geometry", None) or getattr(rec, "source_geometry", None)
        if geom is not None:
            d["shape_zyx"] = [int(v) for v in geom.shape]
            if self.has_patient_space():  # an M3D .npy or an array has no real spacing
                d["spacing_zyx_mm"] = [float(v) for v in geom.spacing]
        elif self.volume is not None:
            d["shape_zyx"] = [int(v) for v in self.volume.shape]
        return d

    def has_patient_space(self) -> bool:
        """True when the source grid has a real geometry (DICOM, NIfTI), not an identity one."""
        rec = self.record
        return rec is not None and not getattr(rec, "identity", False)

    def box_dict(self) -> dict[str, Any] | None:
        """The box in three systems: normalized model grid, source voxel indices, patient mm (LPS)."""
        if not self.box:
            return None
        from m3d_edge.runtime.imaging import box_to_source

        sb = box_to_source(self.box, self.record or identity_record())
        patient = self.has_patient_space()
        return {
            "normalized": [float(v) for v in self.box],
            "grid_voxels": {"min": list(sb.grid_min), "max": list(sb.grid_max)},
            "source_voxels": {"min": list(sb.source_min), "max": list(sb.source_max)},
            "patient_mm_lps": {
                "min": list(sb.mm_min),
                "max": list(sb.mm_max),
                "center": list(sb.mm_center),
            }
            if patient
            else None,
        }

    def mask_dict(self, relative_to: Path | str | None = None) -> dict[str, Any] | None:
        if self.mask is None:
            return None
        files = {k: self._path(v, relative_to) for k, v in self.outputs.items() if k in ("nifti", "seg")}
        return {
            "voxels": int(np.count_nonzero(self.mask)),
            "shape": [int(v) for v in self.mask.shape],
            "source_voxels": self.source_mask_voxels,
            "files": files,
        }

    def timings_dict(self) -> dict[str, Any]:
        t = self.timings
        steps = [float(s) for s in t.get("decode_steps", [])]
        total = float(sum(steps))
        return {
            "vision": _float(t.get("vision")),
            "seg_encoder": _float(t.get("seg_encoder")),
            "prefill": _float(t.get("prefill")),
            "decode_steps": len(steps),
            "decode_seconds": total,
            "decode_tokens_per_s": len(steps) / total if steps and total > 0 else None,
            "seg_decoder": _float(t.get("seg_decoder")),
            "total": _float(t.get("total")),
        }

    @staticmethod
    def _path(p: str, relative_to: Path | str | None) -> str:
        if relative_to is None:
            return str(p)
        try:
            return os.path.relpath(p, relative_to)
        except ValueError:  # another drive (Windows)
            return str(p)

    def to_dict(self, relative_to: Path | str | None = None) -> dict[str, Any]:
        """The JSON result (schema :data:`RESULT_SCHEMA`); file paths relative to ``relative_to`` if given."""
        rec = self.record
        return {
            "schema": RESULT_SCHEMA,
            "question": self.question,
            "task": self.task,
            "target": self.target,
            "prompt": dict(self.prompt),
            "text": self.text,
            "tokens": [int(t) for t in self.tokens],
            "stop_reason": self.stop_reason,
            "study": self.study_dict(),
            "preprocessing": rec.to_dict() if rec is not None and hasattr(rec, "to_dict") else None,
            "box": self.box_dict(),
            "mask": self.mask_dict(relative_to),
            "timings": self.timings_dict(),
            "provenance": {**self.provenance, "runtime": f"m3d-edge {__version__}"},
            "outputs": {k: self._path(v, relative_to) for k, v in self.outputs.items()},
            "notes": list(self.notes),
        }

    def to_json(self, relative_to: Path | str | None = None) -> str:
        return json.dumps(self.to_dict(relative_to), indent=2)


def identity_record() -> PreprocessRecord:
    """The preprocessing record of an input already on the model grid (array or M3D .npy)."""
    from m3d_edge.runtime.imaging import Geometry, PreprocessRecord
    from m3d_edge.runtime.imaging.geometry import TARGET_SHAPE

    return PreprocessRecord(
        source_shape=TARGET_SHAPE,
        crop_start=(0, 0, 0),
        crop_stop=TARGET_SHAPE,
        target_shape=TARGET_SHAPE,
        zoom=(1.0, 1.0, 1.0),
        source_geometry=Geometry.identity(TARGET_SHAPE),
        window="none",
        identity=True,
    )
