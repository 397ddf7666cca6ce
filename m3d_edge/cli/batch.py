"""``m3d-edge batch``: a progress bar and a summary table over the batch engine (:mod:`m3d_edge.jobs`)."""

from __future__ import annotations

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
from m3d_edge.jobs import BatchEvent, run_batch
from m3d_edge.jobs.privacy import private_enabled


def run_batch_cli(
    pipe,
    root: Path,
    out: Path,
    ask_kwargs: dict[str, Any],
    formats: tuple[str, ...],
    want_preview: bool,
    private: bool = False,
) -> dict[str, Any]:
    """:func:`m3d_edge.jobs.run_batch` with a rich progress bar; failures print one line each."""
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
    bar: list[Any] = []

    def on_event(e: BatchEvent) -> None:
        if e.kind == "note":
            note(e.message)
        elif e.kind == "begin":
            bar.append(progress.add_task("batch", total=e.total))
        elif e.kind == "start":
            progress.update(bar[0], description=e.name)
        elif e.kind in ("ok", "skipped", "failed"):
            if e.kind == "failed":
                line = Text("failed ", style="red").append(f"{e.name}: {e.message}", style="")
                progress.console.print(line, soft_wrap=True)
            progress.advance(bar[0])
        elif e.kind == "end" and bar:
            progress.update(bar[0], description="done")

    with progress:
        return run_batch(
            pipe,
            root,
            out,
            ask_kwargs,
            formats,
            previewer=preview if want_preview else None,
            on_event=on_event,
            reraise=lambda exc: debug_enabled(),
            private=private_enabled(private),
        )


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
