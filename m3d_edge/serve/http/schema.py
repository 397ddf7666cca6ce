"""The API's wire format: its version, the request bodies and the result files a client may fetch."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from m3d_edge.errors import PromptError

API_VERSION = "v1"
RESULT_FILES = {  # route name -> (file written in the result folder, media type)
    "mask.nii.gz": ("result_mask.nii.gz", "application/gzip"),
    "seg.dcm": ("result_seg.dcm", "application/dicom"),
    "montage.png": ("montage.png", "image/png"),
    "report.html": ("report.html", "text/html; charset=utf-8"),
    "result.json": ("result.json", "application/json"),
}


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None


class AskRequest(BaseModel):
    """One question: a task preset (with target/question/choices/box) or a free question."""

    model_config = ConfigDict(extra="forbid")
    task: str | None = None
    target: str | None = Field(None, max_length=500)
    question: str | None = Field(None, max_length=4000)
    choices: list[str] | None = Field(None, max_length=4)
    box: list[float] | None = Field(None, min_length=6, max_length=6)
    max_new_tokens: int | None = Field(None, ge=1)
    sampling: SamplingRequest | None = None
    stream: bool = False
    timeout_s: float | None = Field(None, gt=0, description="A shorter time limit than the server's.")
    preview: bool = Field(False, description="Also write montage.png and report.html.")
    force_seg: bool = Field(False, description="Bias [SEG] by +40 (random-weight test models).")

    def ask_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``Pipeline.ask``; raises PromptError (400) for a bad task request."""
        from m3d_edge.runtime.prompts import question_for

        box = tuple(self.box) if self.box is not None else None
        if self.task is None:
            if not (self.question and self.question.strip()):
                raise PromptError("give a task (with target/question) or a free question")
        else:
            question_for(
                self.task, self.target if self.target is not None else self.question, self.choices, box
            )
        return {
            "question": self.question,
            "task": self.task,
            "target": self.target if self.task is not None else None,
            "choices": list(self.choices) if self.choices else None,
            "box": box,
            "max_new_tokens": self.max_new_tokens,
        }


class PathRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., max_length=4096)
