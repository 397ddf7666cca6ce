"""The answer to one question: text, tokens, box, mask, timings, provenance; JSON-serialisable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RESULT_SCHEMA = "m3d-edge/result/1"


@dataclass
class Result:
    question: str
    task: str | None
    text: str
    tokens: list[int]
    stop_reason: str
    box: tuple[float, ...] | None  # normalised [d1, h1, w1, d2, h2, w2] on the model grid
    mask: np.ndarray | None  # bool [D, H, W] on the model grid
    timings: dict[str, Any]
    provenance: dict[str, Any]
    volume: np.ndarray | None = None  # the model input [D, H, W] in [0, 1] (for previews)
    study: Any = None  # the loaded study, when the input was a file
    record: Any = None  # its preprocessing/geometry record
    outputs: dict[str, str] = field(default_factory=dict)  # written files (mask NIfTI, DICOM SEG, ...)

    def to_dict(self) -> dict[str, Any]:
        steps = self.timings.get("decode_steps", [])
        timings = {k: v for k, v in self.timings.items() if k != "decode_steps"}
        timings["decode_steps"] = len(steps)
        timings["decode_seconds"] = float(sum(steps))
        timings["decode_tokens_per_s"] = len(steps) / sum(steps) if steps and sum(steps) > 0 else None
        d: dict[str, Any] = {
            "schema": RESULT_SCHEMA,
            "question": self.question,
            "task": self.task,
            "text": self.text,
            "tokens": list(self.tokens),
            "stop_reason": self.stop_reason,
            "box": {"normalized": list(self.box)} if self.box else None,
            "mask": None
            if self.mask is None
            else {"voxels": int(self.mask.sum()), "shape": list(self.mask.shape)},
            "timings": timings,
            "provenance": self.provenance,
            "outputs": dict(self.outputs),
        }
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
