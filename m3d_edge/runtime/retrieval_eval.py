"""Retrieval evaluation data and metric: (study, report) pairs from a file, and recall@k both ways."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.errors import PromptError
from m3d_edge.runtime.retrieval import Retriever, recall_at_k


def read_pairs(path: Path, split: str | None = None, data_root: Path | None = None) -> list[tuple[Path, str]]:
    """(study path, report text) pairs from a JSON (M3D-Cap style), JSON-lines, CSV or TSV file.

    JSON: a list of ``{"image": ..., "text": ...}`` or ``{split: [...]}`` (choose with ``split``). JSONL:
    one such object per line (``study``/``report`` also accepted). CSV/TSV: ``study,report`` rows. A
    ``text`` ending in ``.txt`` that names a file is read from it. Relative paths are resolved against
    ``data_root`` (default: the pairs file's folder).
    """
    root = Path(data_root) if data_root else path.parent
    if not path.is_file():
        raise PromptError(f"{path}: no such pairs file")
    try:
        raw = path.read_text(encoding="utf-8")
        suffix = path.suffix.lower()
        if suffix == ".json":
            data = json.loads(raw)
            if isinstance(data, dict):
                if split is None and len(data) == 1:
                    split = next(iter(data))
                if split not in data:
                    raise PromptError(f"{path}: choose a split with --split ({', '.join(map(str, data))})")
                data = data[split]
            items = data
        elif suffix == ".jsonl":
            items = [json.loads(ln) for ln in raw.splitlines() if ln.strip()]
        elif suffix in (".csv", ".tsv"):
            reader = csv.reader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
            items = [{"image": row[0], "text": row[1]} for row in reader if row and len(row) >= 2]
        else:
            raise PromptError(f"{path}: pairs must be .json, .jsonl, .csv or .tsv")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: unreadable pairs file ({e})") from e
    pairs: list[tuple[Path, str]] = []
    for k, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, dict):
            raise PromptError(f"{path}: pair {k + 1} is not an object with image and text")
        image, text = item.get("image", item.get("study")), item.get("text", item.get("report"))
        if not isinstance(image, str) or not isinstance(text, str) or not text.strip():
            raise PromptError(f"{path}: pair {k + 1} needs an image/study path and a text/report")
        if text.endswith(".txt") and (root / text).is_file():
            text = (root / text).read_text(encoding="utf-8")
        pairs.append((root / image, text))
    if len(pairs) < 2:
        raise PromptError(f"{path}: need at least 2 (study, report) pairs, found {len(pairs)}")
    return pairs


def evaluate_pairs(
    r: Retriever,
    pairs: list[tuple[Path, str]],
    ks: tuple[int, ...] = (1, 5, 10),
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Recall@k both ways over the pairs (every study must load: a missing one fails the evaluation)."""
    images = np.zeros((len(pairs), r.dim), np.float32)
    for i, (_, emb) in enumerate(r.embed_studies([p for p, _ in pairs])):
        images[i] = emb.vector
        if progress:
            progress(i + 1)
    texts = r.embed_texts([t for _, t in pairs])
    recall = recall_at_k(images @ texts.T, ks)
    return {"pairs": len(pairs), "bundle_id": r.bundle_id, "max_length": r.max_length, **recall}
