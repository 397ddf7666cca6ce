"""Privacy mode: outputs named by a keyed hash, source names kept out of every log and report.

Study folder names are often ``NAME_MRN``. With privacy on, a study's output folder is
``study-<16 hex>`` = HMAC-SHA256(key, folder name), the key being ``OUT/.m3d-edge-key`` (random, created
once, mode 0600) or ``M3D_EDGE_PRIVATE_KEY``; messages have the source path replaced by that alias; the
result JSON carries UIDs replaced by ``2.25.<hash>`` UIDs (DICOM PS3.15 counts UIDs as identifiers); no
DICOM SEG is written (a SEG copies the patient module of its source by design).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

ENV_FLAG = "M3D_EDGE_PRIVATE"
ENV_KEY = "M3D_EDGE_PRIVATE_KEY"
KEY_NAME = ".m3d-edge-key"


def private_enabled(flag: bool = False) -> bool:
    """The ``--private`` flag, or ``M3D_EDGE_PRIVATE=1`` in the environment (for a whole site)."""
    return flag or os.environ.get(ENV_FLAG, "").strip().lower() not in ("", "0", "false", "no")


class Privacy:
    """Aliases and scrubbing for one output folder."""

    def __init__(self, out: Path) -> None:
        env = os.environ.get(ENV_KEY)
        if env:
            self.key = env.encode("utf-8", "surrogateescape")
            return
        path = Path(out) / KEY_NAME
        try:
            self.key = path.read_bytes()
        except FileNotFoundError:
            Path(out).mkdir(parents=True, exist_ok=True)
            key = secrets.token_bytes(32)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first
                self.key = path.read_bytes()
                return
            with os.fdopen(fd, "wb") as f:
                f.write(key)
                f.flush()
                os.fsync(f.fileno())
            self.key = key

    def _digest(self, text: str) -> bytes:
        return hmac.new(self.key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def alias(self, name: str) -> str:
        """``study-<16 hex>``: stable for one key, not reversible without it."""
        return "study-" + self._digest("name:" + name).hex()[:16]

    def uid(self, uid: str | None) -> str | None:
        """A replacement UID under the ``2.25`` (UUID-derived) root, consistent for one key."""
        if not uid:
            return uid
        return "2.25." + str(int.from_bytes(self._digest("uid:" + uid)[:16], "big"))

    def scrub(self, message: str, path: Path, name: str, alias: str) -> str:
        """``message`` with the study's path and name replaced by its alias."""
        for text in sorted({str(path.resolve()), str(path), path.name, name}, key=len, reverse=True):
            if text:
                message = message.replace(text, alias)
        return message

    def redact_result(self, d: dict) -> dict:
        """A result JSON with the study/series UIDs replaced."""
        study = d.get("study") or {}
        for k in ("study_instance_uid", "series_instance_uid"):
            if study.get(k):
                study[k] = self.uid(study[k])
        return d
