"""Write a :class:`~m3d_edge.runtime.result.Result` to disk: JSON, NIfTI mask, DICOM SEG, DICOM SR.

    paths = write_outputs(result, "out/", bundle_id=pipe.manifest.bundle_id,
                          bundle_version=pipe.manifest.producer)

File names are fixed and derived from ``stem`` only (never from DICOM tag values):
``{stem}.json``, ``{stem}_mask.nii.gz``, ``{stem}_seg.dcm``, ``{stem}_sr.dcm``. Every file is written atomically and the
JSON last, so a present ``{stem}.json`` means the whole result is on disk (``batch`` resumes on that).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from m3d_edge.errors import PromptError, StudyError
from m3d_edge.fileio import atomic_write_text
from m3d_edge.runtime.result import Result

FORMATS = ("json", "nifti", "seg", "sr")
DEFAULT_FORMATS = ("json", "nifti", "seg")
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def output_names(stem: str = "result") -> dict[str, str]:
    """The file name of each format for ``stem``."""
    return {
        "json": f"{stem}.json",
        "nifti": f"{stem}_mask.nii.gz",
        "seg": f"{stem}_seg.dcm",
        "sr": f"{stem}_sr.dcm",
    }


def parse_formats(text: str) -> tuple[str, ...]:
    """``"json,seg,sr"`` -> ``("json", "seg", "sr")``; PromptError naming the choices if any is unknown."""
    fmt = tuple(f.strip() for f in str(text).split(",") if f.strip())
    if not fmt or any(f not in FORMATS for f in fmt):
        raise PromptError(f"--format {text!r}: choose from {', '.join(FORMATS)}")
    return fmt


def segment_label(result: Result) -> str:
    """The SEG segment label: the prompt's target (segment tasks) or the question."""
    if result.target:
        return result.target
    if result.task:
        from m3d_edge.runtime.prompts import TASKS

        task = TASKS.get(result.task)
        if task is not None and "{}" in task.template:
            head, tail = task.template.split("{}", 1)
            m = re.fullmatch(re.escape(head) + r"(.+?)" + re.escape(tail), result.question, re.S)
            if m and m.group(1).strip():
                return m.group(1).strip()
    return result.question


def write_outputs(
    result: Result,
    out_dir: Path | str,
    *,
    formats: Iterable[str] = DEFAULT_FORMATS,
    bundle_id: str | None = None,
    bundle_version: str | None = None,
    stem: str = "result",
) -> dict[str, str]:
    """Write the result's files into ``out_dir``; returns ``{format: path}`` of what was written.

    ``nifti``: the mask on the source grid with the source affine (on the model grid with an identity
    affine when the input was an array or an M3D .npy). ``seg``: a DICOM Segmentation referencing the
    source series, only when the study came from DICOM. Nothing is written for the mask when the result has
    none. A SEG that cannot be built (resampled series) is skipped with a note in the JSON. ``sr``: a
    Comprehensive 3D SR (question, text, box, SEG reference) for DICOM studies, see
    :mod:`m3d_edge.runtime.imaging.sr`; other inputs get a note instead.
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise PromptError(f"unknown output format(s) {', '.join(unknown)} (choose from {', '.join(FORMATS)})")
    if not _STEM.match(stem):
        raise PromptError(f"output stem {stem!r}: use letters, digits, '_', '.', '-' (at most 64)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(stem)
    bundle_id = bundle_id or str(result.provenance.get("bundle_id", "m3d-edge"))
    bundle_version = bundle_version or str(result.provenance.get("producer", "m3d-edge"))
    if result.target is None:
        result.target = segment_label(result) if result.task in ("segment", "refer_segment") else None
    written: dict[str, str] = {}

    if result.mask is not None and ("nifti" in formats or "seg" in formats):
        from m3d_edge.runtime.imaging import mask_to_source, write_nifti_mask
        from m3d_edge.runtime.result import identity_record

        record = result.record or identity_record()
        source_mask = mask_to_source(result.mask, record)
        result.source_mask_voxels = int(source_mask.sum())
        if "nifti" in formats:
            path = write_nifti_mask(source_mask, record.source_geometry, out_dir / names["nifti"])
            written["nifti"] = str(path)
        study = result.study
        if "seg" in formats and study is not None and getattr(study, "kind", None) == "dicom":
            from m3d_edge.runtime.imaging import write_dicom_seg

            try:
                path = write_dicom_seg(
                    source_mask,
                    study,
                    out_dir / names["seg"],
                    label=segment_label(result),
                    bundle_id=bundle_id,
                    bundle_version=bundle_version,
                )
                written["seg"] = str(path)
            except StudyError as exc:
                result.notes.append(f"DICOM SEG not written: {exc}")

    if "sr" in formats:
        study = result.study
        if study is not None and getattr(study, "kind", None) == "dicom":
            from m3d_edge.runtime.imaging.sr import write_dicom_sr

            try:
                path = write_dicom_sr(
                    result, study, out_dir / names["sr"], bundle_id=bundle_id, seg_path=written.get("seg")
                )
                written["sr"] = str(path)
            except StudyError as exc:
                result.notes.append(f"DICOM SR not written: {exc}")
        else:
            result.notes.append("DICOM SR not written: the study is not a DICOM series")

    result.outputs.update(written)
    if "json" in formats:
        json_path = out_dir / names["json"]
        result.outputs["json"] = str(json_path)
        written["json"] = str(json_path)
        atomic_write_text(json_path, result.to_json(relative_to=out_dir) + "\n")
    return written
