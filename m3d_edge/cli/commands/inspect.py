"""`inspect`: what a bundle or a study holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from m3d_edge.cli.common import (
    console,
    fmt_bytes,
    handle_errors,
)
from m3d_edge.cli.inspect_study import inspect_study
from m3d_edge.cli.options import (
    ResampleOpt,
    SeriesOpt,
    epilog,
)
from m3d_edge.errors import StudyError

commands = typer.Typer()  # merged into the main app by m3d_edge.cli.app


@commands.command(
    epilog=epilog(
        "m3d-edge inspect ./bundle", "m3d-edge inspect ./ct_folder", "m3d-edge inspect ./bundle --json"
    )
)
@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="A bundle folder or a study.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    series: str | None = SeriesOpt,
    allow_resample: bool = ResampleOpt,
) -> None:
    """Describe a bundle (graphs, precisions, sizes, token ids, dims, calibration) or a study (series found)."""
    from m3d_edge.bundle import MANIFEST

    if not path.exists():
        raise StudyError(f"{path}: no such file or folder")
    if path.is_dir() and (path / MANIFEST).is_file():
        _inspect_bundle(path, as_json)
    else:
        inspect_study(path, as_json, series, allow_resample)


def _inspect_bundle(path: Path, as_json: bool) -> None:
    from m3d_edge.bundle import describe

    info = describe(path)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    integrity = info["integrity"]
    console.print(f"[bold]{info['bundle_id']}[/bold]  ({info['producer']}, schema {info['schema_version']})")
    console.print(
        Text(f"integrity: {integrity}", style="green" if integrity.startswith("ok") else "red"),
        soft_wrap=True,
    )
    source = info["source"].get("checkpoint", "-")
    console.print(f"size on disk: {fmt_bytes(info['total_bytes'])}  ·  source: {source}")
    console.print(_graphs_table(info["graphs"]))
    console.print(_pairs_table("dims", info["dims"]))
    console.print(_pairs_table("token ids", info["token_ids"]))
    if info["calibration"]:
        console.print(_calibration_table(info["calibration"]))
    else:
        console.print("[dim]no calibration reports[/dim]")


def _graphs_table(graphs: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="graphs")
    for col in ("graph", "file", "precision", "default", "variants", "size", "opset"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for name, g in graphs.items():
        variants = ", ".join(f"{k} ({fmt_bytes(v['bytes'])})" for k, v in g["variants"].items()) or "-"
        table.add_row(
            name, g["file"], g["precision"], g["default"], variants, fmt_bytes(g["bytes"]), str(g["opset"])
        )
    return table


def _pairs_table(title: str, pairs: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    for k, v in pairs.items():
        table.add_row(k, str(v))
    return table


def _calibration_table(reports: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="calibration reports")
    for col in ("report", "passed", "forced", "size", "metrics"):
        table.add_column(col, overflow="fold")
    for name, rep in reports.items():
        metrics = rep.get("metrics") if isinstance(rep.get("metrics"), dict) else rep
        flat = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if isinstance(v, str | int | float | bool) and k not in ("passed", "forced")
        )
        ratio = rep.get("size_ratio")
        table.add_row(
            name,
            str(rep.get("passed", "-")),
            str(rep.get("forced", "-")),
            f"{ratio:.2f}x" if isinstance(ratio, float) else "-",
            flat or "(see --json)",
        )
    return table
