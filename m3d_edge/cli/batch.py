"""``m3d-edge batch``: one study per subfolder (or .nii/.nii.gz/.npy file), resumable, errors logged."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from m3d_edge.cli.common import console, debug_enabled, fmt_s, note, preview
from m3d_edge.errors import M3DEdgeError, StudyError
from m3d_edge.fileio import atomic_write_text

RESULT_NAME = "result.json"
ERRORS_NAME = "errors.jsonl"
SUMMARY_NAME = "batch.json"
STUDY_SUFFIXES = (".nii.gz", ".nii", ".npy", ".nrrd", ".nhdr", ".mha", ".mhd")
DATA_SUFFIXES = (".raw", ".zraw")  # the data halves of .mhd/.nhdr pairs: not studies, not reported
_PARTIAL = re.compile(r"^\..*\.partial-(\d+)(\..*)?$")


def not_studies(root: Path) -> list[str]:
    """Names of the files directly under ``root`` that ``discover`` does not take as studies."""
    return sorted(
        c.name
        for c in root.iterdir()
        if c.is_file()
        and not c.name.startswith(".")
        and not c.name.lower().endswith(STUDY_SUFFIXES + DATA_SUFFIXES)
        and c.name not in (ERRORS_NAME, SUMMARY_NAME)
    )


def discover(root: Path) -> list[tuple[str, Path]]:
    """(name, path) of every study under ``root``: subfolders, and NIfTI/NRRD/MetaImage/.npy files; sorted."""
    if not root.is_dir():
        raise StudyError(f"{root}: not a folder (batch reads one study per subfolder or volume file)")
    found: list[tuple[str, Path]] = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            found.append((child.name, child))
            continue
        low = child.name.lower()
        suffix = next((s for s in STUDY_SUFFIXES if low.endswith(s)), None)
        if suffix:
            found.append((child.name[: -len(suffix)], child))
    counts: dict[str, int] = {}
    for name, _ in found:
        counts[name] = counts.get(name, 0) + 1
    # "a.npy" and "a.nii" would share an output folder: keep their full names then
    return [(name if counts[name] == 1 else path.name, path) for name, path in found]


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # called before this run writes anything: a file with our pid is stale
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> int:
    """Delete ``.NAME.partial-PID`` files left by a killed run (whose process is gone).

    Call it before this process writes anything; files of other live processes are kept.
    """
    n = 0
    if not out.is_dir():
        return 0
    for p in out.rglob(".*.partial-*"):
        m = _PARTIAL.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            n += 1
    return n


def log_error(out: Path, name: str, exc: BaseException) -> None:
    entry = {
        "study": name,
        "error": " ".join(str(exc).split()),
        "type": type(exc).__name__,
        "exit_code": getattr(exc, "exit_code", 1),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(out / ERRORS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()


def run_batch(
    pipe,
    root: Path,
    out: Path,
    ask_kwargs: dict[str, Any],
    formats: tuple[str, ...],
    want_preview: bool,
) -> dict[str, Any]:
    """Answer the same question on every study; returns the summary (also written to ``batch.json``)."""
    from m3d_edge.runtime.outputs import write_outputs

    studies = discover(root)
    ignored = not_studies(root)
    if ignored:
        more = f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""
        note(f"warning: skipped {len(ignored)} file(s) that are not studies: {', '.join(ignored[:10])}{more}")
    if not studies:
        raise StudyError(
            f"{root}: no studies (subfolders, .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or .npy files) found"
        )
    out.mkdir(parents=True, exist_ok=True)
    cleaned = remove_stale_partials(out)
    if cleaned:
        note(f"removed {cleaned} partial file(s) left by an interrupted run")
    report_mod = None
    if want_preview:
        from m3d_edge.runtime import report as report_mod  # noqa: F811
    entries: list[dict[str, Any]] = []
    ok = skipped = failed = 0
    seconds: list[float] = []
    t_start = time.perf_counter()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        bar = progress.add_task("batch", total=len(studies))
        for name, path in studies:
            study_out = out / name
            report_rel = f"{name}/report.html" if (study_out / "report.html").is_file() else None
            if (study_out / RESULT_NAME).is_file():
                skipped += 1
                entries.append({"name": name, "status": "ok", "report": report_rel, "error": None})
                progress.advance(bar)
                continue
            progress.update(bar, description=name)
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
                if report_mod is not None and preview([result], study_out, title=name) is not None:
                    report_rel = f"{name}/report.html"
                ok += 1
                seconds.append(time.perf_counter() - t0)
                entries.append({"name": name, "status": "ok", "report": report_rel, "error": None})
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one broken study must not stop the batch
                if debug_enabled() and not isinstance(exc, M3DEdgeError):
                    raise
                failed += 1
                log_error(out, name, exc)
                entries.append({"name": name, "status": "failed", "report": None, "error": str(exc)})
                line = Text("failed ", style="red").append(f"{name}: {' '.join(str(exc).split())}", style="")
                progress.console.print(line, soft_wrap=True)
            progress.advance(bar)
        progress.update(bar, description="done")
    summary = {
        "root": str(root),
        "studies": len(studies),
        "ok": ok,
        "skipped": skipped,
        "failed": failed,
        "not_studies": ignored,
        "seconds": time.perf_counter() - t_start,
        "mean_seconds_per_study": sum(seconds) / len(seconds) if seconds else None,
        "entries": entries,
    }
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    if report_mod is not None:
        try:
            report_mod.write_batch_index(entries, out)
        except Exception as exc:  # the results are written; the index is a bonus
            if debug_enabled():
                raise
            note(f"batch index failed ({type(exc).__name__}: {exc})")
    return summary


def summary_table(summary: dict[str, Any], out: Path) -> Table:
    table = Table(title=f"batch: {summary['studies']} studies -> {out}")
    table.add_column("status")
    table.add_column("studies", justify="right")
    table.add_row("[green]written[/green]", str(summary["ok"]))
    table.add_row("already done (skipped)", str(summary["skipped"]))
    table.add_row("[red]failed[/red]" if summary["failed"] else "failed", str(summary["failed"]))
    table.add_row("files that are not studies (ignored)", str(len(summary.get("not_studies", []))))
    table.add_row("time", fmt_s(summary["seconds"]))
    table.add_row("per study", fmt_s(summary["mean_seconds_per_study"]))
    return table
