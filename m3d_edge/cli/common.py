"""Shared pieces of the CLI: consoles, error handling, option parsing and result display."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from m3d_edge.cli.options import value
from m3d_edge.errors import M3DEdgeError, PromptError, StudyError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

STATE: dict[str, Any] = {"debug": False}
EXIT_INTERRUPTED = 130
EXIT_BATCH_PARTIAL = 10  # batch: some studies failed, the others were written (8 is CalibrationError)

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return bool(STATE["debug"]) or os.environ.get("M3D_EDGE_DEBUG", "") not in ("", "0")


def error_line(message: str) -> None:
    """One red line on stderr, never wrapped."""
    text = " ".join(str(message).split())
    err_console.print(Text(f"error: {text}", style="bold red"), soft_wrap=True)


def note(message: str, style: str = "yellow") -> None:
    err_console.print(Text(message, style=style), soft_wrap=True)


def handle_errors(func: F) -> F:
    """Turn :class:`M3DEdgeError` into ``error: <message>`` and its exit code; tracebacks only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except M3DEdgeError as exc:
            if debug_enabled():
                raise
            error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except MemoryError:  # a declared size too large for this machine: the study is unusable here
            if debug_enabled():
                raise
            error_line("out of memory reading or running the study (its declared size is too large here)")
            raise typer.Exit(StudyError.exit_code) from None
        except OSError as exc:
            from m3d_edge.jobs.error_log import is_full, output_failure

            if debug_enabled() or not is_full(exc):
                if debug_enabled():
                    raise
                error_line(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
                raise typer.Exit(1) from None
            err = output_failure(exc, Path(exc.filename) if exc.filename else Path("output"))
            error_line(str(err))
            raise typer.Exit(err.exit_code) from None
        except Exception as exc:  # anything unforeseen: one line, exit 1
            if debug_enabled():
                raise
            error_line(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ parsing


def parse_box(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        box = tuple(float(v) for v in text.replace(" ", "").strip("[]()").split(","))
    except ValueError:
        raise PromptError(f"--box {text!r}: expected six numbers d1,h1,w1,d2,h2,w2 in [0, 1]") from None
    if len(box) != 6 or not all(0.0 <= v <= 1.0 for v in box):
        raise PromptError(f"--box {text!r}: expected six numbers d1,h1,w1,d2,h2,w2 in [0, 1]")
    return box


def check_text(option: str, value: str | None) -> None:
    """Refuse text that is not valid UTF-8 (the shell passed undecodable bytes) with one line, exit 2."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError(
            f"{option}: not valid UTF-8 text (check the terminal's or file's encoding)"
        ) from None


def task_request(
    task: str | None,
    target: str | None,
    question: str | None,
    choices: list[str] | None,
    box: str | None,
) -> dict[str, Any]:
    """Validate the task options before any model is loaded; returns the keyword arguments of ``ask``."""
    from m3d_edge.runtime.prompts import question_for

    for opt, text in (("--task", task), ("--target", target), ("--question", question), ("--box", box)):
        check_text(opt, text)
    for text in choices or []:
        check_text("--choice", text)
    parsed_box = parse_box(box)
    if task is None:
        if not (question and question.strip()):
            raise PromptError("give --task NAME (with --target/--question) or a free --question")
        return {"question": question, "task": None, "target": None, "choices": None, "box": None}
    question_for(task, target if target is not None else question, choices or None, parsed_box)
    return {
        "question": question,
        "task": task,
        "target": target,
        "choices": list(choices) if choices else None,
        "box": parsed_box,
    }


EXPORT_INSTALL = (
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "
    'pip install "m3d-edge[export]" (from a checkout: pip install -e ".[export]", or make demo)'
)


def require_export_extra(command: str) -> None:
    """One line naming the extra when torch & co. are missing (the runtime alone does not need them)."""
    from m3d_edge.errors import ExportError

    missing = []
    for module in ("torch", "transformers", "onnx", "safetensors"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(
            f"`m3d-edge {command}` needs the [export] extra ({', '.join(missing)} not installed): {EXPORT_INSTALL}"
        )


def check_out_dir(out: Path | None, option: str = "--out") -> None:
    """Refuse, before any model is loaded, an output folder that cannot be one (a file, a file above it)."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PromptError(f"{option} {out}: is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PromptError(f"{option} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PromptError(f"{option} {out}: {parent} is not writable")


def check_study_arg(study: Path) -> None:
    """Refuse, before any model is loaded, a study path that does not exist or is no kind we read."""
    from m3d_edge.errors import StudyError

    study = Path(study)
    if not study.exists():
        raise StudyError(f"{study}: no such file or folder")
    if study.is_dir():
        return
    low = study.name.lower()
    if low.endswith((".nii", ".nii.gz", ".npy", ".nrrd", ".nhdr", ".mha", ".mhd")):
        return
    from m3d_edge.runtime.imaging.dicom_files import is_dicom_file

    if not is_dicom_file(study):
        raise StudyError(
            f"{study}: not a DICOM folder or file, NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), "
            "MetaImage (.mha, .mhd) or M3D .npy volume"
        )


def check_numbers(threads: int, max_new_tokens: int | None) -> None:
    if threads < 0:
        raise PromptError(f"--threads {threads}: must be 0 (onnxruntime's default) or more")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise PromptError(f"--max-new-tokens {max_new_tokens}: must be at least 1")


def backend_options(provider: str, threads: int):
    from m3d_edge.runtime.backend import BackendOptions

    return BackendOptions(provider=provider, threads=threads)


def open_pipeline(bundle: Path, precision: Any, threads: int, provider: Any):
    """The bundle's pipeline for these CLI options (enum or plain values)."""
    from m3d_edge.runtime.pipeline import Pipeline

    precision, provider = value(precision), value(provider)
    pipe = Pipeline.open(bundle, backend_options(provider, threads), precision=precision)
    for graph, used in getattr(pipe, "precision_fallbacks", {}).items():
        note(f"warning: --precision {precision}: {graph} runs {used}")
    return pipe


def sampling_params(
    *,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    logit_bias: dict[int, float] | None = None,
):
    from m3d_edge.runtime.generate import SamplingParams

    if sample and temperature <= 0:
        raise PromptError(f"--temperature {temperature}: must be > 0 when sampling")
    if not 0 < top_p <= 1:
        raise PromptError(f"--top-p {top_p}: must be in (0, 1]")
    return SamplingParams(
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        logit_bias=dict(logit_bias or {}),
    )


def stream_writer(to_stderr: bool = False) -> Callable[[str], None]:
    def write(delta: str) -> None:
        out = sys.stderr if to_stderr else sys.stdout
        out.write(delta)
        out.flush()

    return write


# ------------------------------------------------------------------------------------------ display


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def fmt_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def fmt_vec(v: list[float] | tuple[float, ...], nd: int = 1) -> str:
    return "[" + ", ".join(f"{x:.{nd}f}" if isinstance(x, float) else str(x) for x in v) + "]"


def timings_line(t: dict[str, Any]) -> str:
    parts = [f"vision {fmt_s(t.get('vision'))}", f"prefill {fmt_s(t.get('prefill'))}"]
    tps = t.get("decode_tokens_per_s")
    parts.append(
        f"decode {t.get('decode_steps', 0)} steps {fmt_s(t.get('decode_seconds'))}"
        + (f" ({tps:.0f} tok/s)" if tps else "")
    )
    if t.get("seg_encoder") is not None:
        parts.append(f"seg encoder {fmt_s(t.get('seg_encoder'))}")
    if t.get("seg_decoder") is not None:
        parts.append(f"seg decoder {fmt_s(t.get('seg_decoder'))}")
    parts.append(f"total {fmt_s(t.get('total'))}")
    return " · ".join(parts)


def warn_study(study) -> None:
    """The study's warnings (skipped files, dropped localizers, resampling) on stderr."""
    for n in getattr(study, "notes", None) or []:
        note(f"warning: {n}")


def show_result(result, title: str | None = None) -> None:
    """A human-readable view of one result (the JSON holds everything)."""
    d = result.to_dict()
    if title:
        console.rule(Text(title, style="bold"))
    console.print(Text("question: ", style="bold").append(Text(d["question"], style="")), soft_wrap=True)
    console.print(Text("answer:   ", style="bold").append(Text(d["text"] or "(empty)")), soft_wrap=True)
    console.print(f"[dim]{len(d['tokens'])} tokens, stopped on {d['stop_reason']}[/dim]")
    box = d["box"]
    if box:
        console.print(f"[bold]box[/bold] normalized {fmt_vec(box['normalized'], 3)}")
        sv = box["source_voxels"]
        console.print(f"    source voxels (z,y,x) {sv['min']} .. {sv['max']}")
        if box["patient_mm_lps"]:
            mm = box["patient_mm_lps"]
            console.print(
                f"    patient LPS mm {fmt_vec(mm['min'])} .. {fmt_vec(mm['max'])}, centre {fmt_vec(mm['center'])}"
            )
    elif result.task == "locate":
        console.print("[dim]no box in the answer[/dim]")
    mask = d["mask"]
    if mask:
        src = f", {mask['source_voxels']} on the source grid" if mask["source_voxels"] is not None else ""
        console.print(f"[bold]mask[/bold] {mask['voxels']} voxels on the model grid{src}")
    elif result.task in ("segment", "refer_segment"):
        console.print("[dim]no [SEG] token in the answer: no mask[/dim]")
    for kind, path in d["outputs"].items():
        console.print(Text(f"wrote {kind}: {path}", style="green"), soft_wrap=True)
    for n in d["notes"]:
        note(n)
    console.print(f"[dim]{timings_line(d['timings'])}[/dim]", soft_wrap=True)


def _encoder_time(seconds: float | None) -> str:
    """An encoder's time, or "cached" when the study's features came from an earlier question (0 s)."""
    return "cached" if seconds == 0.0 else fmt_s(seconds)


def latency_table(rows: list[tuple[str, dict[str, Any]]], title: str = "latency") -> Table:
    table = Table(title=title)
    for col in ("task", "vision", "seg enc", "prefill", "decode", "tok/s", "seg dec", "total"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, t in rows:
        tps = t.get("decode_tokens_per_s")
        table.add_row(
            name,
            _encoder_time(t.get("vision")),
            _encoder_time(t.get("seg_encoder")),
            fmt_s(t.get("prefill")),
            f"{t.get('decode_steps', 0)} / {fmt_s(t.get('decode_seconds'))}",
            f"{tps:.0f}" if tps else "-",
            fmt_s(t.get("seg_decoder")),
            fmt_s(t.get("total")),
        )
    return table


def preview(results: list, out_dir: Path, title: str | None = None) -> Path | None:
    """Montages and an HTML report (:mod:`m3d_edge.runtime.report`) next to the written results."""
    from m3d_edge.runtime.report import render_montage, write_study_report

    try:
        montages = []
        for i, r in enumerate(results):
            stem = r.task or "result"
            name = f"{stem}_montage.png" if len(results) > 1 else "montage.png"
            if len(results) > 1 and sum(1 for x in results if (x.task or "result") == stem) > 1:
                name = f"{stem}{i}_montage.png"
            montages.append(render_montage(r, Path(out_dir) / name))
        return write_study_report(results, Path(out_dir), montages=montages, title=title)
    except Exception as exc:  # a preview is a bonus: the results are already written
        if debug_enabled():
            raise
        note(f"preview failed ({type(exc).__name__}: {exc}); the results are written")
        return None
