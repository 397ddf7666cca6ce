"""The DICOM node's state on disk: every series is a folder that moves between state folders by rename.

    STATE/incoming/RUN/SOP.dcm                 instances as they arrive (each written atomically)
    STATE/processing/RUN/instances/SOP.dcm     claimed by the worker once the series was quiet
    STATE/processing/RUN/out/TASK/result.*     one folder per task; result.json (written last) = task done
    STATE/done/RUN/        STATE/failed/RUN/   finished (error.json says why it failed)
    STATE/ignored/RUN/     no rule matched     STATE/corrupt/    instances that could not be read
    STATE/outbox/ID.dcm + ID.json              queued for the destination   STATE/sent/ID.json  delivered

``RUN`` is the SeriesInstanceUID, with ``~2``, ``~3`` ... for a series sent again after an earlier run.
UIDs are checked (digits and dots, at most 64) before they name a folder, so nothing escapes STATE.
A rename is atomic on one file system, so a killed listener finds each series in exactly one state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from m3d_edge.fileio import atomic_write_text

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STATES = ("incoming", "processing", "done", "failed", "ignored")


def valid_uid(uid: Any) -> bool:
    return isinstance(uid, str) and len(uid) <= 64 and bool(UID.match(uid))


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Spool:
    """The folders under ``root`` and the moves between them."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        for name in (*STATES, "corrupt", "outbox", "sent"):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def folder(self, state: str) -> Path:
        return self.root / state

    def runs(self, state: str) -> list[Path]:
        """Run folders in ``state``, oldest first."""
        base = self.folder(state)
        found = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    # -- arriving ----------------------------------------------------------------------------
    def incoming_path(self, series_uid: str, sop_uid: str) -> Path:
        return self.folder("incoming") / series_uid / f"{sop_uid}.dcm"

    def quiet_runs(self, quiet_seconds: float, now: float | None = None) -> list[Path]:
        """Incoming series whose folder has not changed for ``quiet_seconds`` (a new file changes it)."""
        now = time.time() if now is None else now
        return [p for p in self.runs("incoming") if now - p.stat().st_mtime >= quiet_seconds]

    def run_name(self, series_uid: str) -> str:
        """The first free run name for a series: its UID, then ``UID~2``, ``UID~3``..."""
        name, n = series_uid, 1
        while any((self.folder(s) / name).exists() for s in STATES[1:]):
            n += 1
            name = f"{series_uid}~{n}"
        return name

    def claim(self, incoming: Path) -> Path:
        """Move a quiet incoming series to ``processing/RUN/instances`` (atomic rename); returns RUN's folder."""
        run = self.folder("processing") / self.run_name(incoming.name)
        run.mkdir(parents=True)
        os.replace(incoming, run / "instances")
        return run

    def move(self, run: Path, state: str) -> Path:
        dst = self.folder(state) / run.name
        if dst.exists():  # an earlier attempt of the same run (a retried failure): the newer wins
            shutil.rmtree(dst)
        os.replace(run, dst)
        return dst

    def spool_bytes(self) -> int:
        """Bytes of instances held (incoming and processing); done runs keep only outputs by default."""
        total = 0
        for state in ("incoming", "processing"):
            for dirpath, _, files in os.walk(self.folder(state)):
                for f in files:
                    with contextlib.suppress(OSError):  # removed while we walked
                        total += os.stat(os.path.join(dirpath, f)).st_size
        return total

    def quarantine(self, data: bytes | Path, name: str, reason: str) -> Path:
        """Keep an unreadable instance in ``corrupt/`` with a note (never a patient attribute)."""
        base = self.folder("corrupt")
        stem = re.sub(r"[^0-9A-Za-z_.~-]", "_", name)[:100] or "instance"
        dst = base / f"{stem}.dcm"
        n = 1
        while dst.exists():
            n += 1
            dst = base / f"{stem}-{n}.dcm"
        if isinstance(data, Path):
            os.replace(data, dst)
        else:
            from m3d_edge.fileio import atomic_write_bytes

            atomic_write_bytes(dst, data)
        write_json(dst.with_suffix(".json"), {"reason": reason, "time": now_iso()})
        return dst

    # -- operator ----------------------------------------------------------------------------
    def retry_failed(self, names: list[str] | None = None) -> list[str]:
        """Move failed runs (all, or those named) back to processing; tasks already done are kept."""
        moved = []
        for run in self.runs("failed"):
            if names and run.name not in names:
                continue
            (run / "error.json").unlink(missing_ok=True)
            self.move(run, "processing")
            moved.append(run.name)
        return moved
