"""A study index for M3D-CLIP retrieval: vectors in faiss, metadata (and the vectors) in SQLite.
An index is a folder::

    index.sqlite         studies (id, name, UIDs, content hash, source path unless private), vectors,
                         meta (bundle id, dim, generation, ...); every change is one transaction
    vectors-<gen>.faiss  the faiss index of generation <gen>: a cache rebuilt from SQLite when missing

SQLite is the truth; the faiss file is derived from it. Each change bumps ``generation`` in the same
transaction as the rows, and the faiss file of that generation is written to a temporary name and renamed
into place, so a killed build or add leaves either the old state or the new one, never a half-indexed
study, and a stale faiss file is never used. Ids are never reused (SQLite AUTOINCREMENT).

Exact inner product (``IndexIDMap2(IndexFlatIP)``) below :data:`APPROX_MIN` vectors; from there an
inverted-file index (``IndexIVFFlat``, inner product, ``nlist`` about ``sqrt(n)``) searched with
``nprobe`` lists: on 2 cores the exact scan of 1M x 768 float32 costs about 0.1 s per query, the IVF
search a few ms (``benchmarks/results/retrieval_bench.json``). faiss is the ``[retrieval]`` extra.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.errors import BundleError, PromptError
from m3d_edge.fileio import atomic_path
from m3d_edge.runtime.retrieval_faiss import (
    APPROX_MIN,
    DEFAULT_NPROBE,
    FaissIndex,
    Ids,
    Vectors,
    build_faiss_index,
    faiss_module,
    faiss_search,
    is_ivf,
    ivf_nlist,
)
from m3d_edge.runtime.retrieval_records import (
    DB_NAME,
    DDL,
    SCHEMA,
    Hit,
    Record,
    RetrievalIndexError,
    now,
    source_key,
)

_FAISS_FILE = re.compile(r"^vectors-(\d+)\.faiss$")


class StudyIndex:
    """An index folder opened for reading and writing (see the module docstring)."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path, self.db = path, db
        self.meta: dict[str, str] = dict(db.execute("SELECT key, value FROM meta").fetchall())
        for k in ("bundle_id", "dim", "generation", "schema"):
            if k not in self.meta:
                raise RetrievalIndexError(f"{path / DB_NAME}: not an m3d-edge index (no {k} in meta)")
        if int(self.meta["schema"]) != SCHEMA:
            raise RetrievalIndexError(
                f"{path / DB_NAME}: index schema {self.meta['schema']} (this m3d-edge reads {SCHEMA})"
            )
        self._faiss_index: FaissIndex | None = None
        self._faiss_gen = -1

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: Path | str,
        bundle_id: str,
        dim: int,
        *,
        bundle_path: Path | str | None = None,
        privacy: bool = False,
        approx_min: int = APPROX_MIN,
    ) -> StudyIndex:
        """A new index, or the existing one at ``path`` when it was built by the same bundle (resume)."""
        path = Path(path)
        if (path / DB_NAME).is_file():
            idx = cls.open(path)
            idx.check_bundle(bundle_id, bundle_path or "this bundle")
            return idx
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RetrievalIndexError(
                f"{path}: exists and is not an m3d-edge index (choose an empty or new folder)"
            )
        path.mkdir(parents=True, exist_ok=True)
        db = cls._connect(path)
        with db:
            db.executescript(DDL)
            meta = {
                "schema": str(SCHEMA),
                "bundle_id": bundle_id,
                "dim": str(int(dim)),
                "generation": "0",
                "privacy": "1" if privacy else "0",
                "approx_min": str(int(approx_min)),
                "nprobe": str(DEFAULT_NPROBE),
                "bundle_path": str(Path(bundle_path).resolve()) if bundle_path else "",
                "created": now(),
            }
            db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        return cls(path, db)

    @classmethod
    def open(cls, path: Path | str) -> StudyIndex:
        path = Path(path)
        if not (path / DB_NAME).is_file():
            raise RetrievalIndexError(
                f"{path}: not an m3d-edge index (no {DB_NAME}; build one with `m3d-edge index build`)"
            )
        try:
            db = cls._connect(path)
            db.execute("SELECT count(*) FROM studies").fetchone()
        except sqlite3.DatabaseError as e:
            raise RetrievalIndexError(f"{path / DB_NAME}: unreadable index database ({e})") from e
        return cls(path, db)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path / DB_NAME), isolation_level=None)  # explicit transactions only
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> StudyIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- properties ------------------------------------------------------------------------------
    @property
    def bundle_id(self) -> str:
        return self.meta["bundle_id"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def privacy(self) -> bool:
        return self.meta.get("privacy") == "1"

    @property
    def generation(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    @property
    def bundle_path(self) -> Path | None:
        return Path(self.meta["bundle_path"]) if self.meta.get("bundle_path") else None

    def __len__(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM studies").fetchone()[0])

    def check_bundle(self, bundle_id: str, where: Any = "the bundle") -> None:
        """Refuse a bundle other than the one that built this index (its vectors live in another space)."""
        if bundle_id != self.bundle_id:
            raise BundleError(
                f"{self.path}: built with bundle {self.bundle_id}, but {where} is {bundle_id}; embeddings of"
                " different models are not comparable (rebuild the index with this bundle)"
            )

    def has_source(self, key: str) -> int | None:
        row = self.db.execute("SELECT id FROM studies WHERE source_key=?", (key,)).fetchone()
        return int(row[0]) if row else None

    # -- changes ---------------------------------------------------------------------------------
    def add(self, records: Sequence[Record], vectors: np.ndarray, *, sync: bool = True) -> list[int]:
        """Insert studies and their vectors in one transaction; returns their new ids.

        ``sync`` also writes the faiss file of the new generation (an index build passes False and
        calls :meth:`sync` once at the end).
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(records) != len(vectors):
            raise ValueError("one vector per record")
        if not np.all(np.isfinite(vectors)):
            raise RetrievalIndexError("refusing non-finite embedding vectors")
        was = self.generation
        ids: list[int] = []
        with self._transaction():
            for r, v in zip(records, vectors, strict=True):
                cur = self.db.execute(
                    "INSERT INTO studies (source_key, name, source_path, study_uid, series_uid, content_hash,"
                    " kind, bundle_id, added) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.source_key,
                        None if self.privacy else r.name,
                        None if self.privacy else r.source_path,
                        r.study_uid,
                        r.series_uid,
                        r.content_hash,
                        r.kind,
                        self.bundle_id,
                        now(),
                    ),
                )
                if cur.lastrowid is None:
                    raise RetrievalIndexError(f"{self.path / DB_NAME}: an insert returned no row id")
                ids.append(cur.lastrowid)
                self.db.execute("INSERT INTO vectors VALUES (?, ?)", (ids[-1], v.tobytes()))
            self._bump()
        if self._faiss_gen == was and self._faiss_index is not None:  # keep the loaded index current
            self._faiss_index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
            self._faiss_gen = was + 1
        if sync:
            self.sync()
        return ids

    def remove(self, ids: Sequence[int], *, sync: bool = True) -> list[int]:
        """Delete studies by id (one transaction); returns the ids that existed."""
        found = [
            int(i) for i in ids if self.db.execute("SELECT 1 FROM studies WHERE id=?", (int(i),)).fetchone()
        ]
        if not found:
            return []
        was = self.generation
        with self._transaction():
            for i in found:
                self.db.execute("DELETE FROM vectors WHERE id=?", (i,))
                self.db.execute("DELETE FROM studies WHERE id=?", (i,))
            self._bump()
        if self._faiss_gen == was and self._faiss_index is not None:
            self._faiss_index.remove_ids(np.asarray(found, dtype=np.int64))
            self._faiss_gen = was + 1
        if sync:
            self.sync()
        return found

    def resolve(self, refs: Sequence[str]) -> list[int]:
        """Ids for references given on the command line: an id, a study name, a Study or Series UID."""
        out: list[int] = []
        for ref in refs:
            ref = str(ref).strip()
            if re.fullmatch(r"\d+", ref):
                out.append(int(ref))
                continue
            rows = self.db.execute(
                "SELECT id FROM studies WHERE name=? OR study_uid=? OR series_uid=?", (ref, ref, ref)
            ).fetchall()
            if not rows:
                raise PromptError(f"{self.path}: no indexed study with id, name or UID {ref!r}")
            out.extend(int(r[0]) for r in rows)
        return out

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: committed when the block ends, rolled back when it raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")

    # -- faiss -----------------------------------------------------------------------------------
    def _faiss_path(self, gen: int) -> Path:
        return self.path / f"vectors-{gen}.faiss"

    def vectors(self) -> tuple[Ids, Vectors]:
        """(ids int64 ``[N]``, vectors float32 ``[N, dim]``) from SQLite, in id order."""
        rows = self.db.execute("SELECT id, vec FROM vectors ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
        return ids, vecs

    def wants_approximate(self, n: int | None = None) -> bool:
        return (len(self) if n is None else n) >= int(self.meta.get("approx_min", APPROX_MIN))

    def _build_faiss(self) -> FaissIndex:
        ids, vecs = self.vectors()
        return build_faiss_index(vecs, ids, approximate=self.wants_approximate(len(ids)))

    def faiss_index(self) -> FaissIndex:
        """The faiss index of the current generation: loaded from its file, else rebuilt from SQLite."""
        faiss = faiss_module()
        gen = self.generation
        if self._faiss_gen == gen and self._faiss_index is not None:
            return self._faiss_index
        path = self._faiss_path(gen)
        index: FaissIndex | None = None
        if path.is_file():
            try:
                index = faiss.read_index(str(path))
            except RuntimeError:  # a damaged cache: rebuild it
                index = None
            if index is not None and index.ntotal != len(self):
                index = None
        if index is None:
            index = self._build_faiss()
        self._faiss_index, self._faiss_gen = index, gen
        return index

    def sync(self) -> Path:
        """Write the faiss file of the current generation (atomically) and delete older ones."""
        faiss = faiss_module()
        index = self.faiss_index()
        if not is_ivf(index) and self.wants_approximate():  # grew past the exact range: rebuild as IVF
            index = self._build_faiss()
            self._faiss_index = index
        gen = self._faiss_gen
        path = self._faiss_path(gen)
        if not path.is_file():
            with atomic_path(path) as tmp:
                faiss.write_index(index, str(tmp))
        for p in self.path.iterdir():
            m = _FAISS_FILE.match(p.name)
            if m and int(m.group(1)) != gen:
                p.unlink(missing_ok=True)
        return path

    # -- search ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, top_k: int = 10, nprobe: int | None = None) -> list[list[Hit]]:
        """Top-k studies by inner product for each query vector (``[dim]`` or ``[Q, dim]``)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise PromptError(
                f"query of shape {tuple(queries.shape)}: expected [{self.dim}] or [Q, {self.dim}]"
            )
        if top_k < 1:
            raise PromptError(f"--top-k {top_k}: must be at least 1")
        index = self.faiss_index()
        if is_ivf(index):
            probes = nprobe or int(self.meta.get("nprobe", DEFAULT_NPROBE))
            faiss_module().extract_index_ivf(index).nprobe = int(probes)
        k = min(top_k, max(index.ntotal, 1))
        scores, ids = faiss_search(index, q, k)
        wanted = {int(i) for i in ids.ravel() if i >= 0}
        rows = {}
        if wanted:
            marks = ",".join("?" * len(wanted))
            for row in self.db.execute(
                "SELECT id, name, study_uid, series_uid, content_hash, source_path FROM studies"
                f" WHERE id IN ({marks})",
                sorted(wanted),
            ):
                rows[int(row[0])] = row
        out = []
        for srow, irow in zip(scores, ids, strict=True):
            hits = []
            for s, i in zip(srow, irow, strict=True):
                if i < 0 or int(i) not in rows:
                    continue
                r = rows[int(i)]
                hits.append(Hit(int(i), float(s), r[1], r[2], r[3], r[4], r[5]))
            out.append(hits)
        return out

    def memory_bytes(self) -> int:
        """Bytes of the serialised faiss index (about its memory when loaded)."""
        return int(faiss_module().serialize_index(self.faiss_index()).nbytes)


__all__ = [
    "APPROX_MIN",
    "DB_NAME",
    "Hit",
    "Record",
    "RetrievalIndexError",
    "StudyIndex",
    "build_faiss_index",
    "faiss_search",
    "ivf_nlist",
    "source_key",
]
