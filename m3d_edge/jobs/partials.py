"""Leftovers of a killed run: ``.NAME.partial-PID`` files whose writer is gone."""

from __future__ import annotations

import os
import re
from pathlib import Path

_PARTIAL = re.compile(r"^\..*\.partial-(\d+)(\..*)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # called before this run writes anything: a file with our pid is stale
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> int:
    """Delete ``.NAME.partial-PID`` files left by a killed run (whose process is gone).

    Call it before this process writes anything; files of other live processes are kept.
    """
    n = 0
    if not out.is_dir():
        return 0
    for p in out.rglob(".*.partial-*"):
        m = _PARTIAL.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            n += 1
    return n
