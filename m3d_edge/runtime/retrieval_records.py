"""What a retrieval index stores: its error, one study's :class:`Record`, a search :class:`Hit`, the SQLite schema."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3d_edge.errors import BundleError

DB_NAME = "index.sqlite"
SCHEMA = 1


class RetrievalIndexError(BundleError):
    """An index folder is missing, corrupted or unreadable (exit code 4, like a bad bundle)."""


def source_key(path: Path | str) -> str:
    """Stable key of a study's source for resuming (a hash: the path itself is kept only when allowed)."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()


@dataclass
class Record:
    """What is stored about one indexed study."""

    source_key: str
    content_hash: str
    name: str | None = None
    source_path: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    kind: str | None = None


@dataclass
class Hit:
    id: int
    score: float
    name: str | None
    study_uid: str | None
    series_uid: str | None
    content_hash: str
    source_path: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_key TEXT NOT NULL UNIQUE,
    name TEXT,
    source_path TEXT,
    study_uid TEXT,
    series_uid TEXT,
    content_hash TEXT NOT NULL,
    kind TEXT,
    bundle_id TEXT NOT NULL,
    added TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY REFERENCES studies(id), vec BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS studies_study_uid ON studies(study_uid);
CREATE INDEX IF NOT EXISTS studies_series_uid ON studies(series_uid);
"""


def now() -> str:
    """The current UTC time, as the index records it."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
