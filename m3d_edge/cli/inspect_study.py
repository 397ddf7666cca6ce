"""``m3d-edge inspect STUDY``: the series found in a DICOM folder and which one is chosen and why, or a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.table import Table
from rich.text import Text

from m3d_edge.cli.common import console, note
from m3d_edge.errors import StudyError


def inspect_study(path: Path, as_json: bool, series: str | None = None, allow_resample: bool = False) -> None:
    """Print the series under a folder (``series`` picks one as ``run --series`` would), or one file."""
    from m3d_edge.runtime.imaging import load_study, scan_folder

    if not path.is_dir():
        _inspect_file(load_study(path, series=series, allow_resample=allow_resample), as_json)
        return
    skipped: list[tuple[str, str]] = []
    infos = scan_folder(path, series, skipped)
    if not infos:
        raise StudyError(f"{path}: no DICOM files found")
    for s in infos:
        if s.irregular and not s.problem:
            s.problem = None if allow_resample else f"{s.irregular}; refused unless --allow-resample"
            if allow_resample:
                s.reason += f" (resampled: {s.irregular})"
    if as_json:
        sys.stdout.write(json.dumps([i.to_dict() for i in infos], indent=2, default=str) + "\n")
    else:
        table = Table(title=f"DICOM series under {path}")
        for col in ("", "series", "modality", "class", "slices", "orientation", "description", "why"):
            table.add_column(col, overflow="fold")
        for s in infos:
            why = s.reason + (f" [problem: {s.problem}]" if s.problem else "")
            table.add_row(
                "[green]→[/green]" if s.chosen else "",
                str(s.series_number if s.series_number is not None else "-"),
                s.modality,
                s.sop_class,
                str(s.n_slices),
                s.orientation or "-",
                s.description,
                Text(why),
            )
        console.print(table)
        chosen = [s for s in infos if s.chosen]
        if chosen:
            console.print(f"would use: {chosen[0].name}", soft_wrap=True)
    for name, why in skipped:
        note(f"warning: skipped unreadable file {name} ({why})")
    if not any(s.chosen for s in infos):
        raise StudyError(f"{path}: no usable CT series (see the table)")


def _inspect_file(study, as_json: bool) -> None:
    info = {
        "kind": study.kind,
        "shape_zyx": list(study.hu.shape),
        "spacing_zyx_mm": list(study.geometry.spacing),
        "value_range": [float(study.hu.min()), float(study.hu.max())],
        "preprocessed": study.preprocessed,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": study.series_instance_uid,
        "notes": study.notes,
    }
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    table = Table(title=str(study.source_path), show_header=False)
    for k, v in info.items():
        table.add_row(k, str(v))
    console.print(table)
