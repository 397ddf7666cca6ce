"""The ``m3d-edge`` command line: thin typer commands over the Python API.

Errors: every :class:`~m3d_edge.errors.M3DEdgeError` becomes one red line ``error: <message>`` and the
exit code of its class; tracebacks only with ``m3d-edge --debug ...`` (or ``M3D_EDGE_DEBUG=1``).
"""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.panel import Panel
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from m3d_edge import __version__
from m3d_edge.cli import ray as _ray  # --ray/--workers options of batch (m3d_edge.serve.ray_batch)
from m3d_edge.cli.common import (
    EXIT_BATCH_PARTIAL,
    STATE,
    check_numbers,
    check_out_dir,
    check_study_arg,
    console,
    error_line,
    fmt_bytes,
    fmt_s,
    handle_errors,
    latency_table,
    note,
    open_pipeline,
    preview,
    require_export_extra,
    sampling_params,
    show_result,
    stream_writer,
    task_request,
    warn_study,
)
from m3d_edge.errors import BundleError, GenerationError, PromptError, StudyError
from m3d_edge.runtime.prompts import SEG_FORCE_BIAS

EXIT_CODES = (
    "Exit codes: 0 ok · 1 unexpected error · 2 bad usage, unknown task or bad argument · "
    "3 study unreadable or unusable · 4 bundle missing, corrupted or unsupported · "
    "5 backend/provider failure · 6 export failure · 7 generation limit (context length) · "
    "8 calibration failed · 10 batch finished with some failed studies · "
    "11 another batch holds the --out folder · 12 outputs cannot be written (disk full, read-only) · "
    "130 interrupted."
)

APP_HELP = f"""M3D-LaMed on the edge: compile the 3D medical multimodal LLM to ONNX and run it without torch.

Start with [bold]m3d-edge demo[/bold] (no weights or data needed), then
[bold]m3d-edge export CKPT -o BUNDLE[/bold] and [bold]m3d-edge run BUNDLE STUDY --task segment --target liver[/bold].

Add --debug before the command for full tracebacks.

{EXIT_CODES}"""

TASK_HELP = "report | vqa | vqa_closed | locate | describe_region | segment | refer_segment"


class Provider(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    tensorrt = "tensorrt"
    trt = "trt"  # native TensorRT engines built by `m3d-edge build-engines`


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    int4 = "int4"


class PromptFormat(str, Enum):
    auto = "auto"
    demo = "demo"
    train = "train"


class Family(str, Enum):
    phi3 = "phi3"
    llama = "llama"


CkptFamily = Enum(
    "CkptFamily", {"phi3": "phi3", "llama": "llama", "clip": "clip"}, type=str
)  # clip: M3D-CLIP


class Preset(str, Enum):
    tiny = "tiny"
    bench = "bench"
    wide = "wide"
    full = "full"


class Method(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


def _v(x: Any) -> Any:
    """The plain value of an enum option (None stays None)."""
    return x.value if isinstance(x, Enum) else x


app = typer.Typer(
    name="m3d-edge",
    help=APP_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"m3d-edge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one error line."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    STATE["debug"] = debug


def _epilog(*examples: str) -> str:
    lines = "\n\n".join(f"  [cyan]{e}[/cyan]" for e in examples)
    return f"[bold]Examples[/bold]\n\n{lines}\n\n{EXIT_CODES}"


# ------------------------------------------------------------------------------------------ options

BundleArg = typer.Argument(..., help="Bundle folder written by `m3d-edge export`.", show_default=False)
StudyArg = typer.Argument(
    ..., help="DICOM folder or file, NIfTI (.nii/.nii.gz) or M3D .npy.", show_default=False
)
TaskOpt = typer.Option(None, "--task", "-t", help=f"Task preset: {TASK_HELP}.")
TargetOpt = typer.Option(None, "--target", help="What to locate/segment (locate, segment).")
QuestionOpt = typer.Option(None, "--question", "-q", help="The question (vqa, refer_segment, or free).")
ChoiceOpt = typer.Option(None, "--choice", help="An answer option for vqa_closed; give it four times.")
BoxOpt = typer.Option(None, "--box", help="d1,h1,w1,d2,h2,w2 in [0, 1] for describe_region.")
MaxNewOpt = typer.Option(None, "--max-new-tokens", "-n", help="Stop after N new tokens (bundle default 256).")
PrecisionOpt = typer.Option(None, "--precision", help="Graph precision variant.")
ThreadsOpt = typer.Option(0, "--threads", help="Intra-op threads per graph (0: onnxruntime's default).")
ProviderOpt = typer.Option(Provider.cpu, "--provider", help="Execution provider.")
PrivateOpt = typer.Option(
    False,
    "--private",
    "--anonymize-names",
    help="Privacy mode (also M3D_EDGE_PRIVATE=1): outputs named by a keyed hash, no source names in logs "
    "or reports, UIDs replaced in the JSON, no DICOM SEG.",
)
SeriesOpt = typer.Option(
    None,
    "--series",
    help="DICOM series to use: SeriesInstanceUID, SeriesNumber or a SeriesDescription substring "
    "(default: the axial CT series with the most slices; `m3d-edge inspect STUDY` lists them).",
)
ResampleOpt = typer.Option(
    False,
    "--allow-resample",
    help="Resample a DICOM series with missing slices or uneven spacing onto a uniform grid instead of "
    "refusing it (no DICOM SEG then: it could not reference the source slices).",
)
PromptFormatOpt = typer.Option(
    PromptFormat.auto,
    "--prompt-format",
    help="auto: task presets as in M3D's training data (a space after the image tokens, none for report), "
    "free questions as M3D's demo scripts (no space); demo or train: that format for every prompt.",
)
FormatOpt = typer.Option(
    None,
    "--format",
    help="Comma-separated: json, nifti, seg, sr (DICOM SR of the answer); default: each that applies "
    "(json, nifti with a mask, seg for a DICOM series).",
)
ForceSegOpt = typer.Option(
    False,
    "--force-seg",
    help=f"Bias the [SEG] token by +{SEG_FORCE_BIAS:g} so a mask is produced (random-weight test models).",
)


# ------------------------------------------------------------------------------------------ demo


@app.command(epilog=_epilog("m3d-edge demo", "m3d-edge demo --out /tmp/demo --family llama --no-preview"))
@handle_errors
def demo(
    out: Path = typer.Option(Path("m3d-edge-demo"), "--out", "-o", help="Output folder."),
    family: Family = typer.Option(Family.phi3, "--family", help="Decoder family."),
    want_preview: bool = typer.Option(True, "--preview/--no-preview", help="Write montages and report.html."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="New tokens per question."),
) -> None:
    """End to end on a fresh machine: tiny random checkpoint + phantom CT -> bundle -> report, locate, segment.

    Needs the \\[export] extra (torch, transformers, onnx) for the checkpoint and the export; the answers run torch-free. On a fresh machine `make demo` installs it and runs this.
    """
    check_out_dir(out)
    require_export_extra("demo")
    from m3d_edge.export.exporter import export_bundle
    from m3d_edge.export.tiny import write_tiny_checkpoint
    from m3d_edge.runtime.generate import SamplingParams
    from m3d_edge.runtime.imaging.phantom import write_phantom_series
    from m3d_edge.runtime.outputs import write_outputs
    from m3d_edge.runtime.pipeline import Pipeline

    out, family = Path(out), _v(family)
    t_all = time.perf_counter()
    with console.status("writing a tiny random-weight checkpoint ..."):
        ckpt = write_tiny_checkpoint(out / "checkpoint", family=family, preset="tiny", seed=0, seg_band=True)
    console.print(f"[green]✓[/green] checkpoint   {ckpt}  ({family}, tiny preset, random weights)")
    with console.status("writing a synthetic CT series ..."):
        phantom = write_phantom_series(out / "phantom")
    console.print(f"[green]✓[/green] phantom CT   {phantom}  (40 slices of 128x128, DICOM)")
    report = _export_with_progress(export_bundle, ckpt, out / "bundle", overwrite=True)
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


# ------------------------------------------------------------------------------------------ checkpoints


@app.command(
    "tiny-checkpoint",
    epilog=_epilog(
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
    preset: Preset = typer.Option(Preset.tiny, "--preset", help="Model size."),
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

    family, preset = _v(family), _v(preset)
    t0 = time.perf_counter()
    if family == "clip":
        from m3d_edge.cli.retrieval import tiny_clip as write_tiny_checkpoint
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


def _export_with_progress(export_bundle, ckpt: Path, out: Path, **kwargs):
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


@app.command(
    epilog=_epilog(
        "m3d-edge export ./M3D-LaMed-Phi-3-4B -o ./bundle",
        "m3d-edge export ./ckpt -o ./bundle --overwrite --no-validate",
        "m3d-edge export ./M3D-LaMed-Phi-3-4B -o ./bundle-int4 --precision int4   # 2.3 GB, under 12 GB RAM",
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
    precision: Precision = typer.Option(
        Precision.fp32, "--precision", help="Decoder precision (int8/int4: MatMulNBits, quantized per layer)."
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
    from m3d_edge.export.exporter import TOLERANCE, export_bundle

    report = _export_with_progress(
        export_bundle, ckpt, out, allow_pickle=allow_pickle, overwrite=overwrite, validate=validate,
        precision=_v(precision), tensorrt_graph=tensorrt_graph, validate_layers=validate_layers,
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


# ------------------------------------------------------------------------------------------ inspect


@app.command(
    epilog=_epilog(
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
        _inspect_study(path, as_json, series, allow_resample)


def _inspect_bundle(path: Path, as_json: bool) -> None:
    from dataclasses import asdict

    from m3d_edge.bundle import read_manifest, verify_files

    manifest = read_manifest(path, verify=False)
    try:
        verify_files(path, manifest)
        integrity = "ok (every sha256 matches)"
    except BundleError as exc:
        integrity = f"FAILED: {exc}"
    graphs = {}
    for name, g in manifest.graphs.items():
        files = {f: (path / f).stat().st_size if (path / f).is_file() else None for f in g.sha256}
        variants = {}
        for prec, v in g.variants.items():
            vfiles = v.get("sha256", {}) or {v.get("file", ""): None}
            variants[prec] = {
                "file": v.get("file"),
                "bytes": sum((path / f).stat().st_size for f in vfiles if f and (path / f).is_file()),
            }
        graphs[name] = {
            "file": g.file,
            "precision": g.precision,
            "default": g.default,
            "variants": variants,
            "bytes": sum(v for v in files.values() if v),
            "opset": g.opset,
        }
    calibration = {}
    hashed_reports = {
        f for g in manifest.graphs.values() for v in g.variants.values() for f in v.get("sha256", {})
    }
    for p in sorted((path / "calibration").glob("*.json")) if (path / "calibration").is_dir() else []:
        if not p.resolve().is_relative_to(path.resolve()):  # a symlink out of the bundle is not read
            calibration[p.name] = {"error": "outside the bundle (refused)"}
            continue
        try:
            rep = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            rep = {"error": f"unreadable ({type(exc).__name__})"}
        rep = rep if isinstance(rep, dict) else {"value": rep}
        # a failed variant's report is kept unlisted: shown, but not vouched for by a hash
        calibration[p.name] = {**rep, "verified": f"calibration/{p.name}" in hashed_reports}
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    info = {
        "bundle": str(path),
        "bundle_id": manifest.bundle_id,
        "producer": manifest.producer,
        "schema_version": manifest.schema_version,
        "integrity": integrity,
        "total_bytes": total,
        "dims": asdict(manifest.dims),
        "token_ids": manifest.token_ids,
        "prompt": manifest.prompt,
        "generation": manifest.generation,
        "source": manifest.source,
        "graphs": graphs,
        "calibration": calibration,
    }
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    ok = integrity.startswith("ok")
    console.print(
        f"[bold]{manifest.bundle_id}[/bold]  ({manifest.producer}, schema {manifest.schema_version})"
    )
    console.print(Text(f"integrity: {integrity}", style="green" if ok else "red"), soft_wrap=True)
    console.print(f"size on disk: {fmt_bytes(total)}  ·  source: {manifest.source.get('checkpoint', '-')}")
    table = Table(title="graphs")
    for col in ("graph", "file", "precision", "default", "variants", "size", "opset"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for name, g in graphs.items():
        variants = ", ".join(f"{k} ({fmt_bytes(v['bytes'])})" for k, v in g["variants"].items()) or "-"
        table.add_row(
            name, g["file"], g["precision"], g["default"], variants, fmt_bytes(g["bytes"]), str(g["opset"])
        )
    console.print(table)
    d = manifest.dims
    dims = Table(title="dims", show_header=False)
    for k, v in asdict(d).items():
        dims.add_row(k, str(v))
    dims.add_row("context_length", str(d.context_length))
    tok = Table(title="token ids", show_header=False)
    for k, v in manifest.token_ids.items():
        tok.add_row(k, str(v))
    console.print(dims)
    console.print(tok)
    if calibration:
        cal = Table(title="calibration reports")
        for col in ("report", "passed", "forced", "size", "metrics"):
            cal.add_column(col, overflow="fold")
        for name, rep in calibration.items():
            rep = rep if isinstance(rep, dict) else {"value": rep}
            metrics = rep.get("metrics") if isinstance(rep.get("metrics"), dict) else rep
            flat = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in metrics.items()
                if isinstance(v, str | int | float | bool) and k not in ("passed", "forced")
            )
            ratio = rep.get("size_ratio")
            cal.add_row(
                name,
                str(rep.get("passed", "-")),
                str(rep.get("forced", "-")),
                f"{ratio:.2f}x" if isinstance(ratio, float) else "-",
                flat or "(see --json)",
            )
        console.print(cal)
    else:
        console.print("[dim]no calibration reports[/dim]")


def _inspect_study(path: Path, as_json: bool, series: str | None, allow_resample: bool) -> None:
    from m3d_edge.cli.inspect_study import inspect_study

    inspect_study(path, as_json, series, allow_resample)


# ------------------------------------------------------------------------------------------ run


@app.command(
    epilog=_epilog(
        "m3d-edge run ./bundle ./ct_folder --task segment --target liver --out ./out",
        "m3d-edge run ./bundle ./ct_folder --task report --out ./out --format json,sr",
        "m3d-edge run ./bundle ./case.nii.gz --task locate --target 'the spleen' --json",
        "m3d-edge run ./bundle ./case.npy --task vqa -q 'Which organ is abnormal?' --stream",
        "m3d-edge run ./bundle ./case.npy --task vqa_closed -q 'Which plane?' "
        "--choice axial --choice coronal --choice sagittal --choice oblique",
        "m3d-edge run ./bundle ./case.npy --task describe_region --box 0.1,0.2,0.2,0.5,0.6,0.6",
    )
)
@handle_errors
def run(
    bundle: Path = BundleArg,
    study: Path = StudyArg,
    task: str | None = TaskOpt,
    target: str | None = TargetOpt,
    question: str | None = QuestionOpt,
    choice: list[str] | None = ChoiceOpt,
    box: str | None = BoxOpt,
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write result.json, mask NIfTI, DICOM SEG (and SR) here."
    ),
    formats: str = FormatOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the result JSON on stdout (nothing else)."),
    stream: bool = typer.Option(False, "--stream", help="Print the answer as it is generated."),
    max_new_tokens: int | None = MaxNewOpt,
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: all)."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed."),
    precision: Precision | None = PrecisionOpt,
    threads: int = ThreadsOpt,
    provider: Provider = ProviderOpt,
    want_preview: bool = typer.Option(
        False, "--preview", help="Write a montage and report.html (with --out)."
    ),
    force_seg: bool = ForceSegOpt,
    private: bool = PrivateOpt,
    prompt_format: PromptFormat = PromptFormatOpt,
    series: str | None = SeriesOpt,
    allow_resample: bool = ResampleOpt,
) -> None:
    """Ask one question about one study; print the answer, box and mask, optionally write files."""
    from m3d_edge.cli.jobs import write_run_outputs
    from m3d_edge.runtime.outputs import parse_formats

    request = task_request(task, target, question, choice, box)
    fmt = parse_formats(formats)
    if want_preview and out is None:
        raise PromptError("--preview needs --out DIR")
    params = sampling_params(sample=sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    check_numbers(threads, max_new_tokens)
    check_out_dir(out)
    check_study_arg(study)
    pipe = open_pipeline(bundle, precision, threads, provider)
    params.logit_bias.update(pipe.seg_bias(force_seg))
    on_text = stream_writer(to_stderr=as_json) if stream else None
    result = pipe.ask(
        study,
        max_new_tokens=max_new_tokens,
        sampling=params,
        on_text=on_text,
        prompt_format=_v(prompt_format),
        series=series,
        allow_resample=allow_resample,
        **request,
    )
    if stream:
        (sys.stderr if as_json else sys.stdout).write("\n")
    warn_study(result.study)
    if out is not None:
        write_run_outputs(result, out, private, formats=fmt)
    html = preview([result], out) if want_preview and out is not None else None
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        show_result(result)
        if html:
            console.print(Text(f"wrote report: {html}", style="green"), soft_wrap=True)


# ------------------------------------------------------------------------------------------ chat

CHAT_HELP = """commands: a question (free text) · /task NAME [ARG] (e.g. /task segment liver, /task report,
/task vqa_closed question | A | B | C | D, /task describe_region d1,h1,w1,d2,h2,w2) · /help · /quit"""


def _read_line() -> str:
    """One line of stdin decoded as UTF-8 (strict: undecodable bytes raise); "" at end of input."""
    raw = getattr(sys.stdin, "buffer", None)
    return raw.readline().decode("utf-8") if raw is not None else sys.stdin.readline()


def _chat_request(line: str) -> dict[str, Any]:
    rest = line[len("/task") :].strip()
    if not rest:
        raise PromptError("usage: /task NAME [ARG]")
    name, _, arg = rest.partition(" ")
    arg = arg.strip() or None
    if name == "vqa_closed":
        parts = [p.strip() for p in (arg or "").split("|")]
        return task_request(name, None, parts[0] or None, parts[1:], None)
    if name == "describe_region":
        return task_request(name, None, None, None, arg)
    if name in ("vqa", "refer_segment"):
        return task_request(name, None, arg, None, None)
    return task_request(name, arg, None, None, None)


@app.command(
    epilog=_epilog(
        "m3d-edge chat ./bundle ./ct_folder",
        "printf 'Is there a lesion?\\n/task segment liver\\n/quit\\n' | m3d-edge chat ./bundle ./case.npy",
    )
)
@handle_errors
def chat(
    bundle: Path = BundleArg,
    study: Path = StudyArg,
    max_new_tokens: int | None = MaxNewOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Write each answer as turn-N files here."),
    precision: Precision | None = PrecisionOpt,
    threads: int = ThreadsOpt,
    provider: Provider = ProviderOpt,
    force_seg: bool = ForceSegOpt,
    prompt_format: PromptFormat = PromptFormatOpt,
    series: str | None = SeriesOpt,
    allow_resample: bool = ResampleOpt,
) -> None:
    """Ask questions about one study interactively (reads stdin; image features are computed once)."""
    from m3d_edge.runtime.outputs import write_outputs

    check_numbers(threads, max_new_tokens)
    check_out_dir(out)
    check_study_arg(study)
    pipe = open_pipeline(bundle, precision, threads, provider)
    with console.status("loading the study and running the vision encoder ..."):
        state = pipe.prepare(study, series=series, allow_resample=allow_resample)
    warn_study(state.study)
    console.print(f"study ready ({fmt_s(state.timings.get('vision'))} vision). {CHAT_HELP}", soft_wrap=True)
    params = sampling_params(logit_bias=pipe.seg_bias(force_seg))
    turn = 0
    while True:
        console.print("[bold cyan]>[/bold cyan] ", end="")
        try:
            line = _read_line()
        except UnicodeDecodeError:  # a bad line does not end the chat
            error_line("that line is not valid UTF-8 text; skipped")
            continue
        if not line:  # EOF
            console.print()
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line in ("/help", "/?"):
            console.print(CHAT_HELP, soft_wrap=True)
            continue
        try:
            if line.startswith("/task"):
                request = _chat_request(line)
            elif line.startswith("/"):
                raise PromptError(f"unknown command {line.split()[0]!r}; {CHAT_HELP}")
            else:
                request = task_request(None, None, line, None, None)
            try:
                result = pipe.ask(
                    study,
                    max_new_tokens=max_new_tokens,
                    sampling=params,
                    on_text=stream_writer(),
                    prompt_format=_v(prompt_format),
                    series=series,
                    allow_resample=allow_resample,
                    **request,
                )
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
                if pipe.state is not None:
                    pipe.state.cache = None  # a half-written KV cache is not reused
                sys.stdout.write("\n")
                note("answer stopped (Ctrl-C); ask again, or /quit")
                continue
            sys.stdout.write("\n")
            turn += 1
            if out is not None:
                write_outputs(result, out, stem=f"turn-{turn}")
            extra = []
            if result.box:
                extra.append(f"box {result.box}")
            if result.mask is not None:
                extra.append(f"mask {int(result.mask.sum())} voxels")
            d = result.timings_dict()
            extra.append(f"prefill {fmt_s(d['prefill'])}, total {fmt_s(d['total'])}")
            console.print(f"[dim]{' · '.join(extra)}[/dim]", soft_wrap=True)
        except (PromptError, GenerationError) as exc:  # a bad question does not end the chat
            error_line(str(exc))


# ------------------------------------------------------------------------------------------ batch


@app.command(
    epilog=_epilog(
        "m3d-edge batch ./bundle ./studies --task segment --target liver --out ./results",
        "m3d-edge batch ./bundle ./studies --task report --out ./results --preview",
        "m3d-edge batch ./bundle ./studies --task report --out ./results --ray auto --workers 4 --worker-gpus 1",
    )
)
@handle_errors
def batch(
    bundle: Path = BundleArg,
    root: Path = typer.Argument(
        ..., help="Folder with one study per subfolder (or .nii/.nii.gz/.npy files).", show_default=False
    ),
    task: str | None = TaskOpt,
    target: str | None = TargetOpt,
    question: str | None = QuestionOpt,
    choice: list[str] | None = ChoiceOpt,
    box: str | None = BoxOpt,
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (one subfolder per study).", show_default=False
    ),
    formats: str | None = FormatOpt,
    max_new_tokens: int | None = MaxNewOpt,
    precision: Precision | None = PrecisionOpt,
    threads: int = ThreadsOpt,
    provider: Provider = ProviderOpt,
    want_preview: bool = typer.Option(False, "--preview", help="Per-study report.html and an index.html."),
    force_seg: bool = ForceSegOpt,
    private: bool = PrivateOpt,
    prompt_format: PromptFormat = PromptFormatOpt,
    ray_address: str | None = _ray.RayOpt,
    workers: int = _ray.WorkersOpt,
    worker_cpus: float = _ray.WorkerCpusOpt,
    worker_gpus: float = _ray.WorkerGpusOpt,
    series: str | None = SeriesOpt,
    allow_resample: bool = ResampleOpt,
) -> None:
    """Run one task over many studies: resumable (done studies are skipped), errors go to errors.jsonl.

    Each study gets OUT/NAME/result.json (+ result_mask.nii.gz, result_seg.dcm). Exit code 0 when every
    study is done, 10 when some failed (see OUT/errors.jsonl); rerun the same command to retry them.
    A study is redone when the bundle, task, question, sampling, precision or its files changed; a second
    batch on the same OUT exits 11. --private names outputs by a keyed hash (see the README).
    """
    from m3d_edge.cli.batch import run_batch_cli, summary_table
    from m3d_edge.runtime.outputs import parse_formats

    request = task_request(task, target, question, choice, box)
    fmt = parse_formats(formats)
    if not root.is_dir():
        raise StudyError(f"{root}: not a folder")
    check_numbers(threads, max_new_tokens)
    check_out_dir(out)
    from m3d_edge.jobs.discovery import check_out

    check_out(out, root)
    pipe = open_pipeline(bundle, precision, threads, provider)
    params = sampling_params(logit_bias=pipe.seg_bias(force_seg))
    request = dict(
        request,
        max_new_tokens=max_new_tokens,
        sampling=params,
        prompt_format=_v(prompt_format),
        series=series,
        allow_resample=allow_resample,
    )
    if ray_address is not None:  # Ray Data: same outputs, resume and error log; see m3d_edge.serve.ray_batch
        ray_opts = (ray_address, workers, worker_cpus, worker_gpus, _v(precision), threads, _v(provider))
        summary = _ray.run_ray_batch_cli(pipe, root, out, request, fmt, want_preview, private, *ray_opts)
    else:
        summary = run_batch_cli(pipe, root, out, request, fmt, want_preview, private)
    console.print(summary_table(summary, out))
    if summary["failed"]:
        n = summary["failed"]
        note(
            f"{n} {'study' if n == 1 else 'studies'} failed; see {out / 'errors.jsonl'} (rerun to retry them)",
            "red",
        )
        raise typer.Exit(EXIT_BATCH_PARTIAL)


# ------------------------------------------------------------------------------------------ bench


@app.command(
    epilog=_epilog(
        "m3d-edge bench ./bundle --iters 5 --threads 2",
        "m3d-edge bench ./bundle --study ./ct_folder --json",
        "m3d-edge bench ./bundle --reference ./checkpoint --iters 3",
    )
)
@handle_errors
def bench(
    bundle: Path = BundleArg,
    study: Path | None = typer.Option(None, "--study", help="Study to encode (default: a CT-like volume)."),
    iters: int = typer.Option(3, "--iters", min=1, help="Timed iterations."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed warm-up iterations."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="New tokens per run."),
    threads: int = ThreadsOpt,
    precision: Precision | None = PrecisionOpt,
    provider: Provider = ProviderOpt,
    reference: Path | None = typer.Option(
        None, "--reference", help="Checkpoint: also time the torch reference (needs torch) and print ratios."
    ),
) -> None:
    """Latency percentiles per graph, TTFT, decode tokens/s and peak RSS.

    The benchmark models and protocol: docs/architecture.md, section 8 "Benchmark models and protocol".
    """
    from m3d_edge.cli.bench import bench_pipeline, bench_reference, load_image

    pipe = open_pipeline(bundle, precision, threads, provider)
    image = load_image(pipe, study)
    with console.status("benchmarking ...") if not as_json else _nullcontext():
        res = bench_pipeline(pipe, image, iters, warmup, max_new_tokens)
        if reference is not None:
            res["reference"] = bench_reference(reference, pipe, image, iters, warmup, max_new_tokens, threads)
            ours, ref = res["stages"], res["reference"]["stages"]
            res["ratios"] = {
                "vision_speedup": ref["vision"]["p50"] / ours["vision"]["p50"],
                "ttft_speedup": ref["ttft"]["p50"] / ours["ttft"]["p50"],
                "decode_tokens_per_s_ratio": ours["decode_tokens_per_s"]["p50"]
                / max(ref["decode_tokens_per_s"]["p50"], 1e-12),
            }
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2) + "\n")
        return
    table = Table(title=f"{res['bundle_id']} (p50/p90/p99 of {res['iters']} runs)")
    for col in ("stage", "p50", "p90", "p99", "n"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name in ("vision", "seg_encoder", "seg_decoder", "prefill", "ttft"):
        s = res["stages"][name]
        table.add_row(name, fmt_s(s["p50"]), fmt_s(s["p90"]), fmt_s(s["p99"]), str(s["n"]))
    d = res["stages"]["decode_tokens_per_s"]
    table.add_row("decode tok/s", f"{d['p50']:.1f}", f"{d['p90']:.1f}", f"{d['p99']:.1f}", str(d["n"]))
    console.print(table)
    precisions = ", ".join(f"{k}={v}" for k, v in res["precision"].items())
    console.print(
        f"{', '.join(res['provider'])} · {res['threads'] or 'default'} threads · prompt {res['prompt_tokens']} "
        f"tokens + {res['new_tokens']} new · precision {precisions} · peak RSS {fmt_bytes(res['peak_rss_bytes'])}",
        soft_wrap=True,
    )
    if "reference" in res:
        ref, r = res["reference"]["stages"], res["ratios"]
        cmp = Table(title="vs torch reference (p50)")
        for col in ("metric", "onnx", "torch", "ratio"):
            cmp.add_column(col, justify="left" if col == "metric" else "right")
        cmp.add_row(
            "vision",
            fmt_s(res["stages"]["vision"]["p50"]),
            fmt_s(ref["vision"]["p50"]),
            f"{r['vision_speedup']:.2f}x",
        )
        cmp.add_row(
            "TTFT",
            fmt_s(res["stages"]["ttft"]["p50"]),
            fmt_s(ref["ttft"]["p50"]),
            f"{r['ttft_speedup']:.2f}x",
        )
        cmp.add_row(
            "decode tok/s",
            f"{d['p50']:.1f}",
            f"{ref['decode_tokens_per_s']['p50']:.1f}",
            f"{r['decode_tokens_per_s_ratio']:.2f}x",
        )
        console.print(cmp)
        console.print(
            "[dim]ratios > 1 mean the bundle is faster (one process; protocol: docs/architecture.md §8)[/dim]"
        )


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ------------------------------------------------------------------------------------------ calibrate


@app.command(
    epilog=_epilog(
        "m3d-edge calibrate ./bundle --data ./calib_studies",
        "m3d-edge calibrate ./bundle --data ./calib --method percentile --samples 64 --force",
    )
)
@handle_errors
def calibrate(
    bundle: Path = BundleArg,
    data: Path = typer.Option(..., "--data", help="Folder of calibration studies.", show_default=False),
    method: Method = typer.Option(Method.minmax, "--method", help="Range method."),
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

        def progress(stage: Any, done: Any = None, total: Any = None, *rest: Any, **kwargs: Any) -> None:
            count = f" {done}/{total}" if done is not None and total is not None else ""
            status.update(Text(f"calibrating: {stage}{count}"))

        result = calibrate_bundle(
            bundle, data, method=_v(method), samples=samples, force=force, progress=progress
        )
    console.print(f"calibration of {bundle} finished")
    if result is not None and callable(getattr(result, "summary", None)):
        console.print(Text(str(result.summary())), soft_wrap=True)
    elif result is not None:
        payload = result.to_dict() if hasattr(result, "to_dict") else result
        try:
            console.print_json(json.dumps(payload, default=str))
        except (TypeError, ValueError):
            console.print(Text(str(payload)))


@app.command(
    "build-engines",
    epilog=_epilog(
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


from m3d_edge.cli import serve as _serve  # noqa: E402  (its own module: m3d-edge serve)

_serve.register(app)

from m3d_edge.cli.listen import register as _register_listen  # noqa: E402

_register_listen(app, _epilog)

from m3d_edge.cli import retrieval as _retrieval  # noqa: E402  (index, search, eval-retrieval)

_retrieval.register(app, _epilog)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
