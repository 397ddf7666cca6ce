"""`demo` and `tiny-checkpoint`: a fresh machine end to end, and random-weight checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.panel import Panel
from rich.text import Text

from m3d_edge.cli.commands.export import export_with_progress
from m3d_edge.cli.common import (
    check_out_dir,
    console,
    fmt_bytes,
    fmt_s,
    handle_errors,
    latency_table,
    preview,
    require_export_extra,
    show_result,
)
from m3d_edge.cli.options import (
    CkptFamily,
    Family,
    Preset,
    epilog,
    value,
)
from m3d_edge.runtime.prompts import SEG_FORCE_BIAS

commands = typer.Typer()  # merged into the main app by m3d_edge.cli.app


@commands.command(epilog=epilog("m3d-edge demo", "m3d-edge demo --out /tmp/demo --family llama --no-preview"))
@handle_errors
def demo(
    out: Path = typer.Option(Path("m3d-edge-demo"), "--out", "-o", help="Output folder."),
    family: Family = typer.Option("phi3", "--family", help="Decoder family."),
    want_preview: bool = typer.Option(True, "--preview/--no-preview", help="Write montages and report.html."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="New tokens per question."),
) -> None:
    """End to end on a fresh machine: tiny random checkpoint + phantom CT -> bundle -> report, locate, segment.

    Needs the \\[export] extra (torch, transformers, onnx) for the checkpoint and the export; the answers run torch-free. On a fresh machine `make demo` installs it and runs this.
    """
    check_out_dir(out)
    require_export_extra("demo")
    from m3d_edge.export.tiny import write_tiny_checkpoint
    from m3d_edge.runtime.generate import SamplingParams
    from m3d_edge.runtime.imaging.phantom import write_phantom_series
    from m3d_edge.runtime.outputs import write_outputs
    from m3d_edge.runtime.pipeline import Pipeline

    out, family = Path(out), value(family)
    t_all = time.perf_counter()
    with console.status("writing a tiny random-weight checkpoint ..."):
        ckpt = write_tiny_checkpoint(out / "checkpoint", family=family, preset="tiny", seed=0, seg_band=True)
    console.print(f"[green]✓[/green] checkpoint   {ckpt}  ({family}, tiny preset, random weights)")
    with console.status("writing a synthetic CT series ..."):
        phantom = write_phantom_series(out / "phantom")
    console.print(f"[green]✓[/green] phantom CT   {phantom}  (40 slices of 128x128, DICOM)")
    report = export_with_progress(ckpt, out / "bundle", overwrite=True)
    console.print(f"[green]✓[/green] bundle       {report.bundle}  ({fmt_s(report.seconds)})")

    pipe = Pipeline.open(report.bundle)
    results_dir = out / "results"
    questions = [
        ("report", {"task": "report"}, None),
        ("locate", {"task": "locate", "target": "liver"}, None),
        ("segment", {"task": "segment", "target": "liver"}, SamplingParams(logit_bias=pipe.seg_bias())),
    ]
    results, rows = [], []
    for stem, kwargs, sampling in questions:
        result = pipe.ask(phantom, max_new_tokens=max_new_tokens, sampling=sampling, **kwargs)
        write_outputs(result, results_dir, stem=stem)
        show_result(result, title=f"{stem}")
        results.append(result)
        rows.append((stem, result.timings_dict()))
    console.print(latency_table(rows, title="latency (tiny model, CPU)"))
    if want_preview:
        html = preview(results, results_dir, title="m3d-edge demo (random weights)")
        if html:
            console.print(f"[green]✓[/green] report       {html}")
    console.print(
        Panel(
            Text(
                "The weights are random: the text above is meaningless by design; this demo shows the "
                "plumbing (DICOM in, ONNX graphs, generation, box/mask mapping, JSON/NIfTI/DICOM SEG out).\n"
                f"For 'segment' the [SEG] token was forced with a logit bias of +{SEG_FORCE_BIAS:g} "
                "(Pipeline.seg_bias()) so a mask is produced.\n"
                "A locate answer from random weights rarely contains a box, so none may be shown.",
            ),
            title="note",
            border_style="yellow",
        )
    )
    console.print(f"outputs in {results_dir}  ·  total {fmt_s(time.perf_counter() - t_all)}")


@commands.command(
    "tiny-checkpoint",
    epilog=epilog(
        "m3d-edge tiny-checkpoint /tmp/ckpt",
        "m3d-edge tiny-checkpoint /tmp/bench --family phi3 --preset bench --seed 1",
        "m3d-edge tiny-checkpoint /tmp/taught --trained   # confident answers, for INT8 gates and demos",
        "m3d-edge tiny-checkpoint /data/phi3-full --preset full   # released sizes, 16 GB (llama: 28 GB)",
    ),
)
@handle_errors
def tiny_checkpoint(
    out: Path = typer.Argument(..., help="Folder to write the checkpoint into.", show_default=False),
    family: CkptFamily = typer.Option("phi3", "--family", help="Decoder family (clip: M3D-CLIP retrieval)."),
    preset: Preset = typer.Option("tiny", "--preset", help="Model size."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    trained: bool = typer.Option(
        False,
        "--trained",
        help="Teach the decoder fixed answers to the task prompts (about a minute for tiny).",
    ),
) -> None:
    """Write a random-weight M3D-LaMed checkpoint in the released folder layout (needs the \\[export] extra)."""
    require_export_extra("tiny-checkpoint")
    from m3d_edge.export.tiny import write_tiny_checkpoint

    family, preset = value(family), value(preset)
    t0 = time.perf_counter()
    if family == "clip":
        from m3d_edge.cli.commands.retrieval import tiny_clip as write_tiny_checkpoint
    with console.status(f"writing a {preset} {family} checkpoint ...") as status:

        def progress(step: int, loss: float) -> None:
            status.update(Text(f"teaching answers: step {step}, loss {loss:.4f}"))

        def layers(done: int, total: int) -> None:
            status.update(Text(f"writing decoder layers: {done}/{total}"))

        path = write_tiny_checkpoint(
            out,
            family=family,
            preset=preset,
            seed=seed,
            trained=trained,
            progress=progress,
            layer_progress=layers,
        )
    size = sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
    console.print(
        f"[green]✓[/green] {path}  ({family}, {preset}, seed {seed}, {fmt_bytes(size)}, "
        f"{fmt_s(time.perf_counter() - t0)})"
    )
