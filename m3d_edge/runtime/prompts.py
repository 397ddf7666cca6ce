"""M3D's prompt format, the task presets, and the box text in both directions.

The prompt is ``"<im_patch>" * 256`` followed by the question; no chat template. Two formats exist in
M3D's own code, and :func:`prompt_separator` picks one:

* ``demo``: ``"<im_patch>" * 256 + question``, no space, as M3D's inference scripts
  (``LaMed/src/demo/demo.py``, ``online_demo.py``) build it. The default for free-form questions.
* ``train``: the training and bench datasets (``LaMed/src/dataset/multi_dataset.py``,
  ``Bench/dataset/multi_dataset.py``) put a space before VQA, positioning and segmentation questions and
  none before caption (report) prompts. The default for task presets.
Box text is ``<bx_start>[d1, h1, w1, d2, h2, w2]<bx_end>`` with coordinates normalised to [0, 1] over
(D, H, W) of the 32x256x256 grid and rounded to 3 decimals.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from m3d_edge.choices import PROMPT_FORMATS
from m3d_edge.errors import PromptError

BOX_START, BOX_END, SEG_TOKEN = "<bx_start>", "<bx_end>", "[SEG]"
SEG_FORCE_BIAS = 40.0  # logit bias on [SEG] that makes a segment answer carry the token (``--force-seg``)


@dataclass(frozen=True)
class Task:
    name: str
    template: str  # "{}" receives the user's argument (target, question, box...)
    needs: str  # what the argument is, for error messages and --help
    space: bool = True  # a space between the image tokens and the question
    wants_box: bool = False
    wants_mask: bool = False


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "report",
            "Can you provide a caption consists of findings for this medical image?",
            "",
            space=False,
        ),
        Task("vqa", "{}", "a question"),
        Task("vqa_closed", "{}", "a question and --choice A..D"),
        Task("locate", "Where is {} in this image? Please output the box.", "a target", wants_box=True),
        Task("describe_region", "What target is present within the coordinates {} ?", "a box"),
        Task(
            "segment",
            "Can you segment the {} in this image? Please output the mask.",
            "a target",
            wants_mask=True,
        ),
        Task("refer_segment", "{} Please output the segmentation mask.", "a description", wants_mask=True),
    )
}


def format_box(box: tuple[float, ...] | list[float]) -> str:
    """``<bx_start>[d1, h1, w1, d2, h2, w2]<bx_end>`` with 3-decimal coordinates."""
    if len(box) != 6 or not all(0.0 <= float(v) <= 1.0 for v in box):
        raise PromptError(f"a box is 6 numbers in [0, 1] (d1, h1, w1, d2, h2, w2), got {list(box)}")
    return f"{BOX_START}[{', '.join(str(round(float(v), 3)) for v in box)}]{BOX_END}"


def question_for(
    task: str,
    arg: str | None = None,
    choices: list[str] | None = None,
    box: tuple[float, ...] | list[float] | None = None,
) -> str:
    """The question text of a task preset (without the image tokens)."""
    if task not in TASKS:
        raise PromptError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    t = TASKS[task]
    if task == "describe_region":
        if box is None:
            raise PromptError("describe_region needs --box d1,h1,w1,d2,h2,w2")
        arg = format_box(box)
    if t.needs and not (arg and arg.strip()):
        raise PromptError(f"task {task!r} needs {t.needs}")
    q = t.template.format(arg.strip() if arg else "")
    if task == "vqa_closed":
        if not choices or len(choices) != 4:
            raise PromptError("vqa_closed needs exactly four choices (A, B, C, D)")
        q += " Choices: " + " ".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices, strict=True))
    return q


def resolve_prompt_format(task: str | None, prompt_format: str | None = "auto") -> str:
    """``auto`` -> ``train`` for a task preset, ``demo`` for a free-form question; others as given."""
    fmt = prompt_format or "auto"
    if fmt not in PROMPT_FORMATS:
        raise PromptError(f"unknown prompt format {fmt!r} (choose from {', '.join(PROMPT_FORMATS)})")
    if fmt == "auto":
        return "train" if task is not None else "demo"
    return fmt


def prompt_separator(task: str | None, prompt_format: str | None = "auto") -> str:
    """What goes between the image tokens and the question: ``""`` or ``" "`` (see the module docstring)."""
    fmt = resolve_prompt_format(task, prompt_format)
    if fmt == "demo":
        return ""
    return " " if task is None or TASKS[task].space else ""


def build_prompt(question: str, image_token: str, num_image_tokens: int, space: bool = True) -> str:
    return image_token * num_image_tokens + (" " if space else "") + question


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(re.escape(BOX_START) + r"\s*\[([^\[\]]*)\]\s*(?:" + re.escape(BOX_END) + ")?")


def parse_box(text: str) -> tuple[float, ...] | None:
    """The first well-formed box in generated text, clipped to [0, 1] and ordered; None if there is none.

    Never raises: truncated, non-numeric or wrong-length boxes are skipped.
    """
    for match in _BOX_RE.finditer(text):
        parts = [p.strip() for p in match.group(1).split(",")]
        if len(parts) != 6 or not all(re.fullmatch(_NUMBER, p) for p in parts):
            continue
        v = [float(p) for p in parts]
        if not all(math.isfinite(x) for x in v):
            continue
        v = [min(1.0, max(0.0, x)) for x in v]
        lo = [min(v[i], v[i + 3]) for i in range(3)]
        hi = [max(v[i], v[i + 3]) for i in range(3)]
        return tuple(lo + hi)
    return None
