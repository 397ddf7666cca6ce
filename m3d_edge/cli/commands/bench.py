"""`bench`: latency percentiles, TTFT, decode speed and peak RSS of a bundle."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from m3d_edge.cli.common import (
    console,
    fmt_bytes,
    fmt_s,
    handle_errors,
    open_pipeline,
)
from m3d_edge.cli.options import (
    BundleArg,
    Precision,
    PrecisionOpt,
    Provider,
    ProviderOpt,
    ThreadsOpt,
    epilog,
)

commands = typer.Typer()  # merged into the main app by m3d_edge.cli.app


@commands.command(
    epilog=epilog(
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
    from m3d_edge.cli.bench import bench_pipeline, bench_reference, load_image, reference_ratios

    pipe = open_pipeline(bundle, precision, threads, provider)
    image = load_image(pipe, study)
    with console.status("benchmarking ...") if not as_json else contextlib.nullcontext():
        res = bench_pipeline(pipe, image, iters, warmup, max_new_tokens)
        if reference is not None:
            res["reference"] = bench_reference(reference, pipe, image, iters, warmup, max_new_tokens, threads)
            res["ratios"] = reference_ratios(res["stages"], res["reference"]["stages"])
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2) + "\n")
        return
    console.print(_stages_table(res))
    precisions = ", ".join(f"{k}={v}" for k, v in res["precision"].items())
    console.print(
        f"{', '.join(res['provider'])} · {res['threads'] or 'default'} threads · prompt {res['prompt_tokens']} "
        f"tokens + {res['new_tokens']} new · precision {precisions} · peak RSS {fmt_bytes(res['peak_rss_bytes'])}",
        soft_wrap=True,
    )
    if "reference" in res:
        console.print(_reference_table(res))
        console.print(
            "[dim]ratios > 1 mean the bundle is faster (one process; protocol: docs/architecture.md §8)[/dim]"
        )


def _stages_table(res: dict[str, Any]) -> Table:
    table = Table(title=f"{res['bundle_id']} (p50/p90/p99 of {res['iters']} runs)")
    for col in ("stage", "p50", "p90", "p99", "n"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name in ("vision", "seg_encoder", "seg_decoder", "prefill", "ttft"):
        s = res["stages"][name]
        table.add_row(name, fmt_s(s["p50"]), fmt_s(s["p90"]), fmt_s(s["p99"]), str(s["n"]))
    d = res["stages"]["decode_tokens_per_s"]
    table.add_row("decode tok/s", f"{d['p50']:.1f}", f"{d['p90']:.1f}", f"{d['p99']:.1f}", str(d["n"]))
    return table


def _reference_table(res: dict[str, Any]) -> Table:
    ours, ref, r = res["stages"], res["reference"]["stages"], res["ratios"]
    table = Table(title="vs torch reference (p50)")
    for col in ("metric", "onnx", "torch", "ratio"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for label, key, ratio in (("vision", "vision", "vision_speedup"), ("TTFT", "ttft", "ttft_speedup")):
        table.add_row(label, fmt_s(ours[key]["p50"]), fmt_s(ref[key]["p50"]), f"{r[ratio]:.2f}x")
    table.add_row(
        "decode tok/s",
        f"{ours['decode_tokens_per_s']['p50']:.1f}",
        f"{ref['decode_tokens_per_s']['p50']:.1f}",
        f"{r['decode_tokens_per_s_ratio']:.2f}x",
    )
    return table
