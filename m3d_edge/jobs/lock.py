"""One batch per output folder: ``OUT/.m3d-edge-batch.lock`` held with ``fcntl.flock`` while it runs.

The lock dies with its process (no stale locks after SIGKILL); the file says who holds it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path
from types import TracebackType

from m3d_edge.errors import OutputLockedError

LOCK_NAME = ".m3d-edge-batch.lock"


class OutputLock:
    """``with OutputLock(out):`` runs the body only when no other process holds ``out``'s lock."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{self.path.parent}: another batch is writing here ({holder}); wait for it or use another --out"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
            return f"pid {int(info['pid'])} on {info['host']}, started {info['started']}"
        except (ValueError, KeyError, TypeError, OSError):
            return "holder unknown"

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
