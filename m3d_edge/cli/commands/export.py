"""`export`, `calibrate` and `build-engines`: checkpoint to bundle, INT8/INT4 variants, TensorRT plans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from m3d_edge.cli.common import (
    console,
    fmt_bytes,
    handle_errors,
    require_export_extra,
)
from m3d_edge.cli.options import (
    BundleArg,
    ExportPrecision,
    Method,
    epilog,
    value,
)
from m3d_edge.errors import StudyError

commands = typer.Typer()  # merged into the main app by m3d_edge.cli.app


def export_with_progress(ckpt: Path, out: Path, **kwargs: Any) -> Any:
    """``export_bundle`` with a spinner line per graph; returns its ``ExportReport``."""
    from m3d_edge.export.exporter import export_bundle

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )
    tasks: dict[str, Any] = {}

    def on_event(name: str, event: str) -> None:
        if event == "start":
            tasks[name] = progress.add_task(f"exporting {name}", total=1)
        elif event == "done" and name in tasks:
            progress.update(tasks[name], completed=1, description=f"[green]✓[/green] {name}")

    with progress:
        return export_bundle(ckpt, out, progress=on_event, **kwargs)


@commands.command(
    epilog=epilog(
        "m3d-edge export ./M3D-LaMed-Phi-3-4B -o ./bundle",
        "m3d-edge export ./ckpt -o ./bundle --overwrite --no-validate",
        "m3d-edge export ./M3D-LaMed-Phi-3-4B -o ./bundle-int4 --precision int4   # 2.3 GB, under 12 GB RAM",
        "m3d-edge export ./M3D-LaMed-Phi-3-4B -o ./bundle-fp16 --precision fp16   # GPUs: fp16 weights and cache",
    )
)
@handle_errors
def export(
    ckpt: Path = typer.Argument(
        ..., help="Checkpoint folder (config.json, safetensors).", show_default=False
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write.", show_default=False),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also read .bin (pickle) weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare every graph with torch."),
    precision: ExportPrecision = typer.Option(
        "fp32",
        "--precision",
        help="Decoder precision (fp16: half-precision weights, activations and cache, for GPUs;"
        " int8/int4: MatMulNBits, quantized per layer).",
    ),
    tensorrt_graph: bool = typer.Option(
        None,
        "--tensorrt-graph/--no-tensorrt-graph",
        help="Also write the standard-op decoder (fp32 default).",
    ),
    validate_layers: int = typer.Option(
        None,
        "--validate-layers",
        help="Decoder layers checked against torch (default: all, or 2 when large).",
    ),
) -> None:
    """Export a checkpoint to a verified bundle: ONNX graphs, embedding table, tokenizer, manifest.

    Needs the \\[export] extra (torch, transformers, onnx, safetensors, sentencepiece).
    """
    require_export_extra("export")
    from m3d_edge.export.exporter import TOLERANCE

    report = export_with_progress(
        ckpt, out, allow_pickle=allow_pickle, overwrite=overwrite, validate=validate,
        precision=value(precision), tensorrt_graph=tensorrt_graph, validate_layers=validate_layers,
    )  # fmt: skip
    table = Table(title=f"bundle {report.bundle}")
    for col in ("graph", "size", "seconds", "max |diff|", "tolerance"):
        table.add_column(col, justify="left" if col == "graph" else "right")
    for g in report.graphs:
        diff = "-" if g.max_abs_diff is None else f"{g.max_abs_diff:.2e}"
        table.add_row(g.name, fmt_bytes(g.bytes), f"{g.seconds:.1f}", diff, f"{TOLERANCE.get(g.name, 0):.0e}")
    table.add_row(
        "[bold]total[/bold]", fmt_bytes(sum(g.bytes for g in report.graphs)), f"{report.seconds:.1f}"
    )
    console.print(table)


@commands.command(
    epilog=epilog(
        "m3d-edge calibrate ./bundle --data ./calib_studies",
        "m3d-edge calibrate ./bundle --data ./calib --method percentile --samples 64 --force",
    )
)
@handle_errors
def calibrate(
    bundle: Path = BundleArg,
    data: Path = typer.Option(..., "--data", help="Folder of calibration studies.", show_default=False),
    method: Method = typer.Option("minmax", "--method", help="Range method."),
    samples: int = typer.Option(32, "--samples", min=1, help="Number of calibration studies to use."),
    force: bool = typer.Option(False, "--force", help="Write variants even if they fail the accuracy gate."),
) -> None:
    """Quantize the bundle's graphs to INT8/INT4 variants with calibration reports and an accuracy gate.

    How variants, reports and gates work: docs/architecture.md, section 6 "Backends and precision".
    """
    from m3d_edge.calibration import calibrate_bundle

    if not data.is_dir():
        raise StudyError(f"{data}: not a folder of calibration studies")
    with console.status("calibrating ...") as status:

        def progress(stage: str, done: int, total: int) -> None:
            status.update(Text(f"calibrating: {stage} {done}/{total}"))

        report = calibrate_bundle(
            bundle, data, method=value(method), samples=samples, force=force, progress=progress
        )
    console.print(f"calibration of {bundle} finished")
    console.print(Text(report.summary()), soft_wrap=True)


@commands.command(
    "build-engines",
    epilog=epilog(
        "m3d-edge build-engines ./bundle",
        "m3d-edge build-engines ./bundle --int8 --max-seq 1024 --workspace-gb 8",
    ),
)
@handle_errors
def build_engines_cmd(
    bundle: Path = BundleArg,
    fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Build FP16 engines."),
    int8: bool = typer.Option(
        False, "--int8", help="Also build INT8 engines from the bundle's QDQ variants."
    ),
    workspace_gb: float = typer.Option(4.0, "--workspace-gb", help="TensorRT builder workspace limit."),
    max_batch: int = typer.Option(1, "--max-batch", min=1, help="Largest batch the engines accept."),
    max_seq: int = typer.Option(
        None, "--max-seq", help="Longest prefill chunk (default: the context length)."
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a plan is up to date."),
) -> None:
    """Build TensorRT engines for this GPU into BUNDLE/engines/ (needs the `gpu` extra and an NVIDIA GPU).

    Run them with `m3d-edge run BUNDLE STUDY --provider trt`.
    """
    from m3d_edge.export.engines import build_engines

    with console.status("building TensorRT engines ...") as status:

        def progress(name: str, event: str) -> None:
            status.update(Text(f"{name}: {event}"))
            if "/" not in name and ("done" in event or "up to date" in event):
                console.print(f"[green]✓[/green] {name}: {event}")

        infos = build_engines(
            bundle,
            fp16=fp16,
            int8=int8,
            workspace_gb=workspace_gb,
            max_batch=max_batch,
            max_seq=max_seq,
            progress=progress,
            force=force,
        )
    table = Table(title=f"TensorRT engines of {bundle}")
    for col in ("graph", "precision", "from", "size", "seconds", "note"):
        table.add_column(col)
    for i in infos:
        seconds = "reused" if i.reused else f"{i.seconds:.1f}"
        table.add_row(i.graph, i.precision, i.source, fmt_bytes(i.bytes), seconds, i.note)
    console.print(table)
