"""Result keys and resume: a study is done only when its result was produced by this very request.

The key holds what produced a result (bundle id, task, prompt, question, sampling, precision, formats and
the study's content hash). It is stored in ``result.json`` (``provenance.job``) and compared on resume;
an empty or corrupt ``result.json``, a different key, or a listed output that is gone means "recompute".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from m3d_edge.runtime.outputs import output_names

RESULT_NAME = "result.json"
REPORT_FILES = ("report.html", "montage.png")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


def normalize(key: dict[str, Any]) -> dict[str, Any]:
    """The key as it reads back from JSON (tuples become lists, int dict keys strings)."""
    return json.loads(json.dumps(key, sort_keys=True, default=_plain))


def request_key(pipe, ask_kwargs: dict[str, Any], formats: tuple[str, ...]) -> dict[str, Any]:
    """Everything about a request that shapes its result, except the study."""
    from m3d_edge.runtime.prompts import question_for

    kw = {k: v for k, v in ask_kwargs.items() if not callable(v)}
    task = kw.get("task")
    try:
        prompt = (
            question_for(task, kw.get("target") if kw.get("target") is not None else kw.get("question"),
                         kw.get("choices"), kw.get("box"))
            if task
            else kw.get("question")
        )  # fmt: skip
    except Exception:  # an invalid request fails per study with its own message
        prompt = None
    key = {
        "bundle_id": pipe.manifest.bundle_id,
        "task": task,
        "question": kw.get("question"),
        "prompt": prompt,
        "request": kw,
        "max_new_tokens": kw.get("max_new_tokens") or pipe.manifest.generation.get("max_new_tokens"),
        "sampling": kw.get("sampling"),
        "precision": dict(getattr(pipe, "precisions", {}) or {}),
        "formats": sorted(formats) if formats is not None else None,  # None: each format that applies
    }
    return normalize(key)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _inside(folder: Path, rel: Any) -> Path | None:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return None
    return folder / rel


def check_done(folder: Path, key: dict[str, Any]) -> tuple[bool, str | None]:
    """(done, why not): done when ``result.json`` parses, carries ``key`` and every listed output exists."""
    path = folder / RESULT_NAME
    if not path.exists():
        return False, None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        return False, "result.json is empty or corrupt"
    job = (d.get("provenance") or {}).get("job") if isinstance(d.get("provenance"), dict) else None
    stored = job.get("key") if isinstance(job, dict) else None
    if not isinstance(stored, dict):
        return False, "result.json has no result key (written by an older m3d-edge or by hand)"
    if stored != key:
        return False, f"{', '.join(differences(stored, key))} changed since result.json was written"
    outputs = d.get("outputs") if isinstance(d.get("outputs"), dict) else {}
    for rel in outputs.values():
        p = _inside(folder, rel)
        if p is None or not p.is_file():
            return False, f"a listed output ({rel}) is missing"
    return True, None


def clear_outputs(folder: Path, stem: str = "result") -> None:
    """Remove the files a new result of ``stem`` will own (JSON first, so a crash leaves it "not done")."""
    names = output_names(stem)
    for name in (names["json"], names["nifti"], names["seg"], names["sr"], *REPORT_FILES):
        (folder / name).unlink(missing_ok=True)
