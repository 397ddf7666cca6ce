"""Arguments and options shared by the commands, their enums (built from :mod:`m3d_edge.choices`) and
the help texts every command repeats (exit codes, examples)."""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer

from m3d_edge.choices import (
    CALIBRATION_METHODS,
    CHECKPOINT_PRESETS,
    EXPORT_PRECISIONS,
    FAMILIES,
    NATIVE_TRT,
    PRECISIONS,
    PROMPT_FORMATS,
    PROVIDERS,
)
from m3d_edge.runtime.prompts import SEG_FORCE_BIAS

EXIT_CODES = (
    "Exit codes: 0 ok · 1 unexpected error · 2 bad usage, unknown task or bad argument · "
    "3 study unreadable or unusable · 4 bundle missing, corrupted or unsupported · "
    "5 backend/provider failure · 6 export failure · 7 generation limit (context length) · "
    "8 calibration failed · 10 batch finished with some failed studies · "
    "11 another batch holds the --out folder · 12 outputs cannot be written (disk full, read-only) · "
    "130 interrupted."
)

TASK_HELP = "report | vqa | vqa_closed | locate | describe_region | segment | refer_segment"


def epilog(*examples: str) -> str:
    """A command's help epilog: its examples, then the exit codes."""
    lines = "\n\n".join(f"  [cyan]{e}[/cyan]" for e in examples)
    return f"[bold]Examples[/bold]\n\n{lines}\n\n{EXIT_CODES}"


def _choices(name: str, names: tuple[str, ...] | list[str]) -> Any:
    """A str enum whose members are ``names`` (typer shows and checks them as choices)."""
    return Enum(name, {n: n for n in names}, type=str)


Provider = _choices("Provider", [*PROVIDERS, NATIVE_TRT])
Precision = _choices("Precision", PRECISIONS)
ExportPrecision = _choices("ExportPrecision", EXPORT_PRECISIONS)
PromptFormat = _choices("PromptFormat", PROMPT_FORMATS)
Family = _choices("Family", FAMILIES)
CkptFamily = _choices("CkptFamily", [*FAMILIES, "clip"])  # clip: M3D-CLIP
Preset = _choices("Preset", CHECKPOINT_PRESETS)
Method = _choices("Method", CALIBRATION_METHODS)


def value(x: Any) -> Any:
    """The plain value of an enum option (None and plain values pass through)."""
    return x.value if isinstance(x, Enum) else x


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
ProviderOpt = typer.Option("cpu", "--provider", help="Execution provider (trt: native TensorRT engines).")
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
    "auto",
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
OutOpt = typer.Option(..., "--out", "-o", help="Output folder.", show_default=False)
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of tables.")
