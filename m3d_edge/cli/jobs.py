"""CLI glue to :mod:`m3d_edge.jobs` shared by ``run`` (and ``chat``): the job writer and privacy mode."""

from __future__ import annotations

from pathlib import Path

from m3d_edge.jobs.outputs import write_result
from m3d_edge.jobs.privacy import Privacy, private_enabled


def write_run_outputs(
    result, out: Path, private: bool = False, formats: tuple[str, ...] | None = None
) -> dict[str, str]:
    """``run --out``: replace the folder's previous result (mask and SEG included) with this one."""
    privacy = Privacy(out) if private_enabled(private) else None
    return write_result(result, Path(out), formats, privacy=privacy)
