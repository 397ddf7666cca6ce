"""`run` and `chat`: questions about one study."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from m3d_edge.cli.common import (
    check_numbers,
    check_out_dir,
    check_study_arg,
    console,
    error_line,
    fmt_s,
    handle_errors,
    note,
    open_pipeline,
    preview,
    sampling_params,
    show_result,
    stream_writer,
    task_request,
    warn_study,
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
    StudyArg,
    TargetOpt,
    TaskOpt,
    ThreadsOpt,
    epilog,
    value,
)
from m3d_edge.errors import GenerationError, PromptError

commands = typer.Typer()  # merged into the main app by m3d_edge.cli.app


@commands.command(
    epilog=epilog(
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
        prompt_format=value(prompt_format),
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


@commands.command(
    epilog=epilog(
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
    ask = dict(
        max_new_tokens=max_new_tokens,
        sampling=sampling_params(logit_bias=pipe.seg_bias(force_seg)),
        prompt_format=value(prompt_format),
        series=series,
        allow_resample=allow_resample,
    )
    turn = 0
    while (line := _next_line()) is not None:
        if line in ("/quit", "/exit", "/q"):
            break
        if line in ("/help", "/?"):
            console.print(CHAT_HELP, soft_wrap=True)
        elif line:
            try:
                result = _chat_answer(pipe, study, line, ask)
            except (PromptError, GenerationError) as exc:  # a bad question does not end the chat
                error_line(str(exc))
                continue
            if result is None:
                continue
            turn += 1
            if out is not None:
                write_outputs(result, out, stem=f"turn-{turn}")
            console.print(f"[dim]{_turn_summary(result)}[/dim]", soft_wrap=True)


def _next_line() -> str | None:
    """The next stripped chat line ("" for a line to skip); None at end of input."""
    console.print("[bold cyan]>[/bold cyan] ", end="")
    try:
        line = _read_line()
    except UnicodeDecodeError:  # a bad line does not end the chat
        error_line("that line is not valid UTF-8 text; skipped")
        return ""
    if not line:  # EOF
        console.print()
        return None
    return line.strip()


def _chat_answer(pipe: Any, study: Path, line: str, ask: dict[str, Any]) -> Any:
    """Answer one chat line (a question or /task ...), streamed; None when Ctrl-C stopped it."""
    if line.startswith("/task"):
        request = _chat_request(line)
    elif line.startswith("/"):
        raise PromptError(f"unknown command {line.split()[0]!r}; {CHAT_HELP}")
    else:
        request = task_request(None, None, line, None, None)
    try:
        result = pipe.ask(study, on_text=stream_writer(), **ask, **request)
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
        if pipe.state is not None:
            pipe.state.cache = None  # a half-written KV cache is not reused
        sys.stdout.write("\n")
        note("answer stopped (Ctrl-C); ask again, or /quit")
        return None
    sys.stdout.write("\n")
    return result


def _turn_summary(result: Any) -> str:
    extra = []
    if result.box:
        extra.append(f"box {result.box}")
    if result.mask is not None:
        extra.append(f"mask {int(result.mask.sum())} voxels")
    d = result.timings_dict()
    extra.append(f"prefill {fmt_s(d['prefill'])}, total {fmt_s(d['total'])}")
    return " · ".join(extra)
