"""Writing one result for a job: the runtime's writer, the result key, and privacy redaction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m3d_edge.fileio import atomic_write_text
from m3d_edge.jobs.privacy import Privacy
from m3d_edge.jobs.resume import RESULT_NAME, clear_outputs


def write_result(
    result,
    folder: Path,
    formats: tuple[str, ...] | None,
    *,
    key: dict[str, Any] | None = None,
    privacy: Privacy | None = None,
) -> dict[str, str]:
    """Replace ``folder``'s previous result with this one; ``result.json`` (always written) comes last.

    With ``privacy`` no DICOM SEG is written (it copies the patient module) and the JSON's UIDs are
    replaced. Returns ``{format: path}``.
    """
    import json

    from m3d_edge.runtime.outputs import applicable_formats, write_outputs

    clear_outputs(folder)
    if key is not None:
        result.provenance = {**result.provenance, "job": {"key": key}}
    asked = formats if formats is not None else applicable_formats(result)
    files = tuple(f for f in asked if f != "json" and not (privacy and f in ("seg", "sr")))
    if privacy is not None and "seg" in asked and result.mask is not None:
        result.notes.append("DICOM SEG not written: privacy mode (a SEG carries the source's patient data)")
    written = write_outputs(result, folder, formats=files, stem="result")
    json_path = folder / RESULT_NAME
    result.outputs["json"] = str(json_path)
    written["json"] = str(json_path)
    d = result.to_dict(relative_to=folder)
    if privacy is not None:
        d = privacy.redact_result(d)
    atomic_write_text(json_path, json.dumps(d, indent=2) + "\n")
    return written
