"""``errors.jsonl``: one line per failed study."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

ERRORS_NAME = "errors.jsonl"


def log_error(out: Path, name: str, exc: BaseException) -> None:
    entry = {
        "study": name,
        "error": " ".join(str(exc).split()),
        "type": type(exc).__name__,
        "exit_code": getattr(exc, "exit_code", 1),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(out / ERRORS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
