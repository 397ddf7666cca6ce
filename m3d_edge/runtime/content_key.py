"""A study's identity by content: a hash of every file a study path can make the readers open.

The study cache and batch resume key on this, not on a path and its modification time: a folder rewritten
in place (same names, same folder mtime) gets a new key, and a copy of a study elsewhere keeps its key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from m3d_edge.errors import StudyError

_CHUNK = 1 << 20


def _feed(h: hashlib.blake2b, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)


def study_files(path: Path) -> list[Path]:
    """The regular files under a study path (the file itself, or every file below a folder), sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise StudyError(f"{path}: no such file or folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(path):  # symlinked folders are not followed
        dirnames.sort()
        files += [Path(dirpath) / n for n in sorted(filenames)]
    return [f for f in files if f.is_file()]


def content_key(path: Path | str) -> str:
    """``blake2b`` over the relative name, size and bytes of every file of the study (hex, 32 chars)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    try:
        for f in study_files(path):
            rel = f.relative_to(path).as_posix() if f != path else ""
            h.update(f"{rel}\0{f.stat().st_size}\0".encode("utf-8", "surrogateescape"))
            _feed(h, f)
    except OSError as e:
        raise StudyError(f"{path}: unreadable ({e.strerror or type(e).__name__})") from None
    return h.hexdigest()
