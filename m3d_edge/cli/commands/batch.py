"""`batch`: one task over many studies, in process or on Ray."""

from __future__ import annotations

from pathlib import Path

import typer

from m3d_edge.cli import ray as _ray
from m3d_edge.cli.common import (
    EXIT_BATCH_PARTIAL,
    check_numbers,
    check_out_dir,
    console,
    handle_errors,
    note,
    open_pipeline,
    sampling_params,
    task_request,
)
from m3d_edge.cli.options import (
    BoxOpt,
    BundleArg,
    ChoiceOpt,
    ForceSegOpt,
    FormatOpt,
    MaxNewOpt,
    Precision,
    PrecisionOpt,
    PrivateOpt,
    PromptFormat,
    PromptFormatOpt,
    Provider,
    ProviderOpt,
    QuestionOpt,
    ResampleOpt,
    SeriesOpt,
    TargetOpt,
    TaskOpt,
    ThreadsOpt,
    epilog,
    value,
)
from m3d_edge.errors import StudyError

commands = typer.Typer()  # merged into the main app by m3d_edge.cli.app


@commands.command(
    epilog=epilog(
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
        prompt_format=value(prompt_format),
        series=series,
        allow_resample=allow_resample,
    )
    if ray_address is not None:  # Ray Data: same outputs, resume and error log; see m3d_edge.serve.ray_batch
        ray_opts = (
            ray_address,
            workers,
            worker_cpus,
            worker_gpus,
            value(precision),
            threads,
            value(provider),
        )
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
