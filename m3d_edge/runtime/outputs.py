"""Write a :class:`~m3d_edge.runtime.result.Result` to disk: JSON, NIfTI mask, DICOM SEG, DICOM SR.

    paths = write_outputs(result, "out/")

File names are fixed and derived from ``stem`` only (never from DICOM tag values):
``{stem}.json``, ``{stem}_mask.nii.gz``, ``{stem}_seg.dcm``, ``{stem}_sr.dcm``. Every file is written atomically and the
JSON last, so a present ``{stem}.json`` means the whole result is on disk (``batch`` resumes on that).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from m3d_edge.errors import PromptError, StudyError
from m3d_edge.fileio import atomic_write_text
from m3d_edge.runtime.result import Result

FORMATS = ("json", "nifti", "seg", "sr")
DEFAULT_FORMATS = ("json", "nifti", "seg")  # asked for when no formats are named: each that applies
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def output_names(stem: str = "result") -> dict[str, str]:
    """The file name of each format for ``stem``."""
    return {
        "json": f"{stem}.json",
        "nifti": f"{stem}_mask.nii.gz",
        "seg": f"{stem}_seg.dcm",
        "sr": f"{stem}_sr.dcm",
    }


def parse_formats(text: str | None) -> tuple[str, ...] | None:
    """``"json,seg,sr"`` -> ``("json", "seg", "sr")``; ``None`` stays ``None`` (each format that applies);
    PromptError naming the choices if any is unknown."""
    if text is None:
        return None
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


def _kind(result: Result) -> str:
    return str(getattr(result.study, "kind", None) or "array")


def applicable_formats(result: Result) -> tuple[str, ...]:
    """The default formats that apply to ``result``: ``seg`` only for a DICOM series that was not resampled."""
    study = result.study
    dicom = study is not None and getattr(study, "kind", None) == "dicom"
    seg = dicom and not getattr(study, "resampled", False)
    return tuple(f for f in DEFAULT_FORMATS if f != "seg" or seg)


def write_outputs(
    result: Result,
    out_dir: Path | str,
    *,
    formats: Iterable[str] | None = None,
    stem: str = "result",
) -> dict[str, str]:
    """Write the result's files into ``out_dir``; returns ``{format: path}`` of what was written.

    ``nifti``: the mask on the source grid with the source affine (on the model grid with an identity
    affine when the input was an array or an M3D .npy). ``seg``: a DICOM Segmentation referencing the
    source series. ``formats=None`` asks for every format that applies (``seg`` only for a DICOM series
    that was not resampled; ``sr`` only when asked for). An asked-for output that cannot be written raises :class:`StudyError`
    naming it, and the JSON is then not written (a present JSON means the whole result is on disk).
    Nothing is written for the mask when the answer has none; a note says so.
    ``sr``: a Comprehensive 3D SR (question, text, box, SEG reference) of a DICOM study, see
    :mod:`m3d_edge.runtime.imaging.sr`.
    """
    explicit = formats is not None
    formats = tuple(formats) if formats is not None else applicable_formats(result)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise PromptError(f"unknown output format(s) {', '.join(unknown)} (choose from {', '.join(FORMATS)})")
    if not _STEM.match(stem):
        raise PromptError(f"output stem {stem!r}: use letters, digits, '_', '.', '-' (at most 64)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(stem)
    if result.target is None:
        result.target = segment_label(result) if result.task in ("segment", "refer_segment") else None
    written: dict[str, str] = {}
    failed: list[str] = []
    _write_mask_outputs(
        result, formats, explicit, out_dir / names["nifti"], out_dir / names["seg"], written, failed
    )
    if "sr" in formats:
        _write_sr(result, out_dir / names["sr"], written, failed)
    result.outputs.update(written)
    if failed:
        raise StudyError(f"{out_dir}: " + "; ".join(failed))
    if "json" in formats:
        written["json"] = _write_json(result, out_dir, out_dir / names["json"])
    return written


def _creator(result: Result) -> tuple[str, str]:
    """The SEG/SR creator: the bundle's id and producer, from the result's provenance."""
    return (
        str(result.provenance.get("bundle_id", "m3d-edge")),
        str(result.provenance.get("producer", "m3d-edge")),
    )


def _write_mask_outputs(
    result: Result,
    formats: tuple[str, ...],
    explicit: bool,
    nifti_path: Path,
    seg_path: Path,
    written: dict[str, str],
    failed: list[str],
) -> None:
    """The mask on the source grid: NIfTI and DICOM SEG (each when asked for and applicable)."""
    wants_mask = "nifti" in formats or "seg" in formats
    if result.mask is None:
        if explicit and wants_mask:
            result.notes.append("no mask in the answer (no [SEG] token): no mask file written")
        return
    if not wants_mask:
        return
    from m3d_edge.runtime.imaging import mask_to_source, write_nifti_mask
    from m3d_edge.runtime.result import identity_record

    record = result.record or identity_record()
    source_mask = mask_to_source(result.mask, record)
    result.source_mask_voxels = int(source_mask.sum())
    if "nifti" in formats:
        written["nifti"] = str(write_nifti_mask(source_mask, record.source_geometry, nifti_path))
    if "seg" in formats:
        _write_seg(result, source_mask, explicit, seg_path, written, failed)


def _write_seg(
    result: Result,
    source_mask: NDArray[np.bool_],
    explicit: bool,
    path: Path,
    written: dict[str, str],
    failed: list[str],
) -> None:
    """A DICOM SEG referencing the source series; refused for a resampled or non-DICOM study."""
    study = result.study
    dicom = study is not None and study.kind == "dicom"
    if study is None or not dicom or study.resampled:
        why = "the series was resampled" if dicom else f"the study is not DICOM ({_kind(result)})"
        if explicit:
            failed.append(f"DICOM SEG not written: {why}; a SEG references a DICOM source series")
        else:
            result.notes.append(f"DICOM SEG not written: {why}")
        return
    from m3d_edge.runtime.imaging import write_dicom_seg

    bundle_id, bundle_version = _creator(result)
    try:
        written["seg"] = str(
            write_dicom_seg(
                source_mask,
                study,
                path,
                label=segment_label(result),
                bundle_id=bundle_id,
                bundle_version=bundle_version,
            )
        )
    except StudyError as exc:
        failed.append(f"DICOM SEG not written: {exc}")


def _write_sr(result: Result, path: Path, written: dict[str, str], failed: list[str]) -> None:
    """A Comprehensive 3D SR of a DICOM study (referencing the SEG when one was written)."""
    study = result.study
    if study is None or getattr(study, "kind", None) != "dicom":
        failed.append(f"DICOM SR not written: the study is not DICOM ({_kind(result)})")
        return
    from m3d_edge.runtime.imaging.sr import write_dicom_sr

    try:
        written["sr"] = str(
            write_dicom_sr(result, study, path, bundle_id=_creator(result)[0], seg_path=written.get("seg"))
        )
    except StudyError as exc:
        failed.append(f"DICOM SR not written: {exc}")


def _write_json(result: Result, out_dir: Path, path: Path) -> str:
    """The result JSON, last (its presence means the whole result is on disk); returns its path."""
    result.outputs["json"] = str(path)
    atomic_write_text(path, result.to_json(relative_to=out_dir) + "\n")
    return str(path)
