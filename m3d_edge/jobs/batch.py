"""The batch engine: the same question on every study of a root, resumable, one error line per failure."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3d_edge.errors import M3DEdgeError, StudyError
from m3d_edge.fileio import atomic_write_text
from m3d_edge.jobs.discovery import discover
from m3d_edge.jobs.error_log import log_error
from m3d_edge.jobs.partials import remove_stale_partials

RESULT_NAME = "result.json"
SUMMARY_NAME = "batch.json"

Previewer = Callable[[list, Path, str | None], Path | None]


@dataclass
class BatchEvent:
    """What the engine reports to its adapter (a progress bar, a log, a queue)."""

    kind: str  # "begin" (total known), "start", "ok", "skipped", "failed", "note", "end"
    name: str = ""
    message: str = ""
    total: int = 0


def run_batch(
    pipe,
    root: Path,
    out: Path,
    ask_kwargs: dict[str, Any],
    formats: tuple[str, ...],
    previewer: Previewer | None = None,
    on_event: Callable[[BatchEvent], None] | None = None,
    reraise: Callable[[BaseException], bool] | None = None,
) -> dict[str, Any]:
    """Answer the same question on every study; returns the summary (also written to ``batch.json``).

    ``previewer(results, folder, title)`` writes a per-study report (and enables ``index.html``);
    ``reraise(exc)`` says whether an unexpected exception should stop the batch (``--debug``).
    """
    from m3d_edge.runtime.outputs import write_outputs

    emit = on_event or (lambda e: None)
    studies = discover(root)
    if not studies:
        raise StudyError(f"{root}: no studies (subfolders, .nii, .nii.gz or .npy files) found")
    out.mkdir(parents=True, exist_ok=True)
    cleaned = remove_stale_partials(out)
    if cleaned:
        emit(BatchEvent("note", message=f"removed {cleaned} partial file(s) left by an interrupted run"))
    entries: list[dict[str, Any]] = []
    ok = skipped = failed = 0
    seconds: list[float] = []
    t_start = time.perf_counter()
    emit(BatchEvent("begin", total=len(studies)))
    for name, path in studies:
        study_out = out / name
        report_rel = f"{name}/report.html" if (study_out / "report.html").is_file() else None
        if (study_out / RESULT_NAME).is_file():
            skipped += 1
            entries.append({"name": name, "status": "ok", "report": report_rel, "error": None})
            emit(BatchEvent("skipped", name))
            continue
        emit(BatchEvent("start", name))
        t0 = time.perf_counter()
        try:
            result = pipe.ask(path, **ask_kwargs)
            written = write_outputs(
                result,
                study_out,
                formats=formats,
                bundle_id=pipe.manifest.bundle_id,
                bundle_version=pipe.manifest.producer,
                stem="result",
            )
            if "json" not in written:  # resumability needs the marker even with --format nifti
                atomic_write_text(study_out / RESULT_NAME, result.to_json(relative_to=study_out) + "\n")
            if previewer is not None and previewer([result], study_out, name) is not None:
                report_rel = f"{name}/report.html"
            ok += 1
            seconds.append(time.perf_counter() - t0)
            entries.append({"name": name, "status": "ok", "report": report_rel, "error": None})
            emit(BatchEvent("ok", name))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken study must not stop the batch
            if not isinstance(exc, M3DEdgeError) and reraise is not None and reraise(exc):
                raise
            failed += 1
            log_error(out, name, exc)
            entries.append({"name": name, "status": "failed", "report": None, "error": str(exc)})
            emit(BatchEvent("failed", name, " ".join(str(exc).split())))
    summary = {
        "root": str(root),
        "studies": len(studies),
        "ok": ok,
        "skipped": skipped,
        "failed": failed,
        "seconds": time.perf_counter() - t_start,
        "mean_seconds_per_study": sum(seconds) / len(seconds) if seconds else None,
        "entries": entries,
    }
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    if previewer is not None:
        from m3d_edge.runtime.report import write_batch_index

        try:
            write_batch_index(entries, out)
        except Exception as exc:  # the results are written; the index is a bonus
            if reraise is not None and reraise(exc):
                raise
            emit(BatchEvent("note", message=f"batch index failed ({type(exc).__name__}: {exc})"))
    emit(BatchEvent("end"))
    return summary
