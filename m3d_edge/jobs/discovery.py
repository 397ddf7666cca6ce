"""Which studies a batch root holds: one per subfolder, or per .nii/.nii.gz/.npy file."""

from __future__ import annotations

from pathlib import Path

from m3d_edge.errors import StudyError

STUDY_SUFFIXES = (".nii.gz", ".nii", ".npy")


def discover(root: Path) -> list[tuple[str, Path]]:
    """(name, path) of every study under ``root``: subfolders, and .nii/.nii.gz/.npy files; sorted."""
    if not root.is_dir():
        raise StudyError(f"{root}: not a folder (batch reads one study per subfolder or volume file)")
    found: list[tuple[str, Path]] = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
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
