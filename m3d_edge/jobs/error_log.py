"""``errors.jsonl``: one line per study that failed in the current run (rewritten by every run).

Each line holds the study's name (its alias in privacy mode), the error class, its exit code and our own
one-line message; text from a library's exception (which may quote file contents or paths) is not kept.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
from pathlib import Path

from m3d_edge.errors import M3DEdgeError, OutputError
from m3d_edge.fileio import append_line

ERRORS_NAME = "errors.jsonl"
MAX_MESSAGE = 400
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def output_failure(exc: OSError, where: Path) -> OutputError:
    """The one-line error of a write that cannot succeed (disk full, quota, read-only)."""
    return OutputError(f"{where}: cannot write output ({exc.strerror or type(exc).__name__})")


def is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL


def error_message(exc: BaseException) -> str:
    """Our one-line message for an error; for anything not ours only its class (no library text)."""
    if isinstance(exc, M3DEdgeError):
        text = " ".join(str(exc).split())
        return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
    return f"unexpected {type(exc).__name__} (details withheld; rerun the study with --debug)"


def reset_log(out: Path) -> None:
    """Start this run's log empty: entries of studies that now succeed must not linger."""
    try:
        (out / ERRORS_NAME).unlink(missing_ok=True)
    except OSError as e:
        raise output_failure(e, out / ERRORS_NAME) from None


def log_error(out: Path, name: str, exc: BaseException, message: str | None = None) -> None:
    entry = {
        "study": name,
        "error": message if message is not None else error_message(exc),
        "type": type(exc).__name__,
        "exit_code": getattr(exc, "exit_code", 1),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        append_line(out / ERRORS_NAME, json.dumps(entry))
    except OSError as e:
        raise output_failure(e, out / ERRORS_NAME) from None
