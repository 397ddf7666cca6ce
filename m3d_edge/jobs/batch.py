"""The batch engine: the same question on every study of a root, resumable, one error line per failure.

Per study: hash its files, compare the result key stored in ``OUT/<folder>/result.json`` (skip when it
matches and every listed output exists), else clear the old outputs and write new ones. ``OUT`` is locked
for the whole run; ``errors.jsonl`` and ``batch.json`` describe this run only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3d_edge.errors import M3DEdgeError, StudyError
from m3d_edge.fileio import atomic_write_text
from m3d_edge.jobs.discovery import check_out, discover, not_studies, output_folder_name
from m3d_edge.jobs.error_log import error_message, is_full, log_error, output_failure, reset_log
from m3d_edge.jobs.lock import OutputLock
from m3d_edge.jobs.outputs import write_result
from m3d_edge.jobs.partials import remove_stale_partials
from m3d_edge.jobs.privacy import Privacy
from m3d_edge.jobs.resume import check_done, differences, normalize, request_key

SUMMARY_NAME = "batch.json"

Previewer = Callable[[list, Path, str | None], Path | None]


@dataclass
class BatchEvent:
    """What the engine reports to its adapter (a progress bar, a log, a queue)."""

    kind: str  # "begin" (total known), "start", "ok", "skipped", "failed", "note", "end"
    name: str = ""
    message: str = ""
    total: int = 0


def _previous_key(out: Path) -> dict[str, Any] | None:
    try:
        d = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return d.get("key") if isinstance(d, dict) and isinstance(d.get("key"), dict) else None


def run_batch(
    pipe,
    root: Path,
    out: Path,
    ask_kwargs: dict[str, Any],
    formats: tuple[str, ...],
    previewer: Previewer | None = None,
    on_event: Callable[[BatchEvent], None] | None = None,
    reraise: Callable[[BaseException], bool] | None = None,
    private: bool = False,
) -> dict[str, Any]:
    """Answer the same question on every study; returns the summary (also written to ``batch.json``).

    ``previewer(results, folder, title)`` writes a per-study report (and enables ``index.html``);
    ``reraise(exc)`` says whether an unexpected exception should stop the batch (``--debug``);
    ``private`` names outputs by a keyed hash and keeps source names out of logs and reports.
    Raises :class:`~m3d_edge.errors.OutputLockedError` when another batch holds ``out``.
    """
    emit = on_event or (lambda e: None)
    check_out(out, root)
    studies = discover(root, exclude=out)
    ignored = not_studies(root, exclude=out)
    if ignored:
        message = f"warning: skipped {len(ignored)} file(s) that are not studies"
        if not private:  # file names can carry patient names
            more = f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""
            message += f": {', '.join(ignored[:10])}{more}"
        emit(BatchEvent("note", message=message))
    if not studies:
        raise StudyError(
            f"{root}: no studies (subfolders, .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or .npy files) found"
        )
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        return _run_locked(
            pipe, root, out, studies, ask_kwargs, formats, previewer, emit, reraise, private, ignored
        )


def prepare_run(
    out: Path, run_key: dict[str, Any], private: bool, emit: Callable[[BatchEvent], None]
) -> Privacy | None:
    """Start a run in a locked ``out``: drop stale partials, set up privacy, note a changed request, reset
    the error log. Shared by local and Ray batch; returns the privacy mode (``None`` when off)."""
    cleaned = remove_stale_partials(out)
    if cleaned:
        emit(BatchEvent("note", message=f"removed {cleaned} partial file(s) left by an interrupted run"))
    privacy = Privacy(out) if private else None  # creates the key once, before any worker reads it
    old = _previous_key(out)
    if old is not None and old != run_key:
        emit(
            BatchEvent(
                "note",
                message=f"{out / SUMMARY_NAME}: replacing the summary of an earlier run with a different "
                f"{', '.join(differences(old, run_key))}; studies it wrote are recomputed",
            )
        )
    reset_log(out)
    return privacy


def _run_locked(pipe, root, out, studies, ask_kwargs, formats, previewer, emit, reraise, private, ignored=()):
    run_key = request_key(pipe, ask_kwargs, formats)
    privacy = prepare_run(out, run_key, private, emit)
    entries: list[dict[str, Any]] = []
    ok = skipped = failed = recomputed = 0
    seconds: list[float] = []
    t_start = time.perf_counter()
    emit(BatchEvent("begin", total=len(studies)))
    for name, path in studies:
        folder_name = privacy.alias(name) if privacy else output_folder_name(name)
        label = folder_name if privacy else name
        study_out = out / folder_name
        report_rel = f"{folder_name}/report.html"
        emit(BatchEvent("start", label))
        t0 = time.perf_counter()
        try:
            from m3d_edge.runtime.content_key import content_key

            key = normalize({**run_key, "study": content_key(path)})
            done, why = check_done(study_out, key)
            if done:
                skipped += 1
                has_report = (study_out / "report.html").is_file()
                entries.append({"name": label, "status": "ok", "report": report_rel if has_report else None})
                entries[-1]["error"] = None
                emit(BatchEvent("skipped", label))
                continue
            if why:
                recomputed += 1
                emit(BatchEvent("note", label, f"{label}: {why}; recomputing"))
            try:
                result = pipe.ask(path, **ask_kwargs)
            except MemoryError:
                raise StudyError(f"{path}: out of memory reading or running this study") from None
            write_result(
                result,
                study_out,
                formats,
                key=key,
                privacy=privacy,
            )
            has_report = previewer is not None and previewer([result], study_out, label) is not None
            ok += 1
            seconds.append(time.perf_counter() - t0)
            entries.append(
                {"name": label, "status": "ok", "report": report_rel if has_report else None, "error": None}
            )
            emit(BatchEvent("ok", label))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken study must not stop the batch
            if is_full(exc):  # no later study can be written either
                raise output_failure(exc, study_out) from None
            if not isinstance(exc, M3DEdgeError) and reraise is not None and reraise(exc):
                raise
            failed += 1
            message = error_message(exc)
            if privacy is not None:
                message = privacy.scrub(message, path, name, folder_name).replace(str(root), "<root>")
            log_error(out, label, exc, message)
            entries.append({"name": label, "status": "failed", "report": None, "error": message})
            emit(BatchEvent("failed", label, message))
    summary = {
        "root": None if privacy else str(root),
        "private": privacy is not None,
        "key": run_key,
        "studies": len(studies),
        "ok": ok,
        "skipped": skipped,
        "recomputed": recomputed,
        "failed": failed,
        "not_studies": ["<withheld>"] * len(ignored) if privacy else list(ignored),  # names can identify
        "seconds": time.perf_counter() - t_start,
        "mean_seconds_per_study": sum(seconds) / len(seconds) if seconds else None,
        "entries": entries,
    }
    try:
        atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        if is_full(e):
            raise output_failure(e, out / SUMMARY_NAME) from None
        raise
    if previewer is not None:
        from m3d_edge.runtime.report import write_batch_index

        try:
            write_batch_index(entries, out)
        except Exception as exc:  # the results are written; the index is a bonus
            if reraise is not None and reraise(exc):
                raise
            emit(BatchEvent("note", message=f"batch index failed ({type(exc).__name__})"))
    emit(BatchEvent("end"))
    return summary
