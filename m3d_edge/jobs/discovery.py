"""Which studies a batch root holds (one per subfolder, or per volume file), and their folders."""

from __future__ import annotations

from pathlib import Path

from m3d_edge.errors import PromptError, StudyError

STUDY_SUFFIXES = (".nii.gz", ".nii", ".npy", ".nrrd", ".nhdr", ".mha", ".mhd")
DATA_SUFFIXES = (".raw", ".zraw")  # the data halves of .mhd/.nhdr pairs: not studies, not reported
# files the batch itself writes into --out: a study of that name gets an escaped folder name
RESERVED = frozenset({"errors.jsonl", "batch.json", "index.html"})
ESCAPE = "~"


def output_folder_name(name: str) -> str:
    """A study's folder under ``--out``: its name, or ``~name`` for our own file names (injective)."""
    if name.lower() in RESERVED or name.startswith(ESCAPE):
        return ESCAPE + name
    return name


def not_studies(root: Path, exclude: Path | None = None) -> list[str]:
    """Names of the files directly under ``root`` that :func:`discover` does not take as studies."""
    skip = exclude.resolve() if exclude is not None else None
    return sorted(
        c.name
        for c in root.iterdir()
        if c.is_file()
        and not c.name.startswith(".")
        and not c.name.lower().endswith(STUDY_SUFFIXES + DATA_SUFFIXES)
        and c.name.lower() not in RESERVED
        and (skip is None or c.resolve() != skip)
    )


def discover(root: Path, exclude: Path | None = None) -> list[tuple[str, Path]]:
    """(name, path) of every study under ``root``: subfolders, and NIfTI/NRRD/MetaImage/.npy files; sorted.

    ``exclude`` (the output folder) is never a study, even when it sits inside ``root``.
    """
    if not root.is_dir():
        raise StudyError(f"{root}: not a folder (batch reads one study per subfolder or volume file)")
    skip = exclude.resolve() if exclude is not None else None
    found: list[tuple[str, Path]] = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or (skip is not None and child.resolve() == skip):
            continue
        if child.is_dir():
            found.append((child.name, child))
            continue
        low = child.name.lower()
        suffix = next((s for s in STUDY_SUFFIXES if low.endswith(s)), None)
        if suffix:
            found.append((child.name[: -len(suffix)], child))
    counts: dict[str, int] = {}
    for name, _ in found:
        counts[name] = counts.get(name, 0) + 1
    # "a.npy" and "a.nii" would share an output folder: keep their full names then
    return [(name if counts[name] == 1 else path.name, path) for name, path in found]


def check_out(out: Path, root: Path) -> None:
    """Refuse an ``--out`` that is a file or lies inside one study's folder; call before loading a model."""
    if out.exists() and not out.is_dir():
        raise PromptError(f"--out {out}: is a file, not a folder")
    if not root.is_dir():
        return
    o, r = out.resolve(), root.resolve()
    if o != r and o.is_relative_to(r):
        top = r / o.relative_to(r).parts[0]
        if top != o:
            raise PromptError(
                f"--out {out}: lies inside the study folder {top.name}; choose a folder outside it"
            )
