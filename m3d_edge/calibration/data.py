"""Calibration data: a folder of studies -> model-input volumes, through exactly the runtime's imaging path.

Every study goes through :func:`m3d_edge.runtime.imaging.load_study` and
:func:`m3d_edge.runtime.imaging.preprocess`, so the quantizer sees what inference sees. A folder holds one
study per entry: a subfolder (a DICOM series; or a folder holding a single NIfTI/``.npy`` file), a NIfTI file
(``.nii``, ``.nii.gz``) or an M3D ``.npy`` volume. The studies are split into calibration and held-out
volumes; held-out volumes are never used for calibration, only for the accuracy report.

When the folder has fewer studies than ``samples + held_out``, the shortfall is filled with augmented copies
(flips along depth, height or width, and central crops of 80-90 % resized back with the runtime's trilinear
resize) of the real volumes, and the data summary says so. Augmented held-out volumes come from the
held-out studies when there are any, else from the calibration studies (a weaker check: the report notes it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3d_edge.errors import StudyError

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")


def _is_volume_file(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and any(name.endswith(s) for s in VOLUME_SUFFIXES)


def find_studies(data_dir: Path | str) -> list[Path]:
    """The studies of a calibration folder, sorted by name: subfolders, NIfTI files and ``.npy`` files."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise StudyError(f"{data_dir}: calibration data folder does not exist")
    studies: list[Path] = []
    for p in sorted(data_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            inner = [q for q in p.iterdir() if not q.name.startswith(".")]
            vols = [q for q in inner if _is_volume_file(q)]
            studies.append(vols[0] if len(vols) == 1 and len(inner) == 1 else p)
        elif _is_volume_file(p):
            studies.append(p)
    return studies


AUGMENTATIONS = ("flip_w", "flip_h", "crop90", "flip_d", "crop80", "flip_w+crop85")


def augment(volume: np.ndarray, kind: str) -> np.ndarray:
    """One documented augmentation of a preprocessed ``[1, 32, 256, 256]`` volume (same shape out)."""
    from m3d_edge.runtime.imaging.preprocess import resize_trilinear

    v = volume[0]
    for part in kind.split("+"):
        if part == "flip_w":
            v = v[:, :, ::-1]
        elif part == "flip_h":
            v = v[:, ::-1, :]
        elif part == "flip_d":
            v = v[::-1, :, :]
        elif part.startswith("crop"):
            frac = int(part[4:]) / 100.0
            shape = v.shape
            size = [max(1, round(s * frac)) for s in shape]
            start = [(s - n) // 2 for s, n in zip(shape, size, strict=True)]
            crop = v[tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))]
            v = resize_trilinear(np.ascontiguousarray(crop), tuple(shape))
        else:
            raise ValueError(f"unknown augmentation {part!r} ({', '.join(AUGMENTATIONS)})")
    return np.ascontiguousarray(v, dtype=np.float32)[None]


@dataclass
class CalibrationData:
    """Model inputs ``[1, 1, 32, 256, 256]`` float32, named, split into calibration and held-out sets."""

    calibration: list[np.ndarray]
    held_out: list[np.ndarray]
    calibration_names: list[str]
    held_out_names: list[str]
    studies: int
    augmented: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "studies": self.studies,
            "calibration": self.calibration_names,
            "held_out": self.held_out_names,
            "augmented": self.augmented,
            "notes": list(self.notes),
        }


def _load(path: Path, window: str) -> np.ndarray:
    from m3d_edge.runtime.imaging import load_study, preprocess

    volume, _ = preprocess(load_study(path), window=window)
    return np.ascontiguousarray(volume, dtype=np.float32)  # [1, 32, 256, 256]


def _fill(
    base: list[tuple[str, np.ndarray]], n: int, offset: int = 0
) -> tuple[list[str], list[np.ndarray], int]:
    names, vols, added = [b[0] for b in base[:n]], [b[1] for b in base[:n]], 0
    k = offset
    while len(vols) < n and base:
        name, vol = base[k % len(base)]
        kind = AUGMENTATIONS[(k // len(base)) % len(AUGMENTATIONS)]
        names.append(f"{name}[{kind}]")
        vols.append(augment(vol, kind))
        added += 1
        k += 1
    return names, vols, added


def load_calibration_data(
    data_dir: Path | str,
    samples: int = 8,
    held_out: int = 2,
    *,
    allow_augment: bool = True,
    window: str = "m3d",
    progress=None,
) -> CalibrationData:
    """Load ``samples`` calibration and ``held_out`` evaluation volumes from a folder of studies.

    Real studies are split first (the last ``held_out`` sorted studies are held out); a shortfall is filled
    with augmentations when ``allow_augment``, else :class:`StudyError` says how many are missing.
    """
    if samples < 1 or held_out < 1:
        raise StudyError(f"need at least 1 calibration and 1 held-out volume (got {samples}, {held_out})")
    paths = find_studies(data_dir)
    if not paths:
        raise StudyError(
            f"{data_dir}: no studies found (expected DICOM subfolders, .nii/.nii.gz or .npy files)"
        )
    need = samples + held_out
    notes: list[str] = []
    if len(paths) < need and not allow_augment:
        raise StudyError(
            f"{data_dir}: {len(paths)} studies, but {samples} calibration + {held_out} held-out are needed "
            "(add studies, lower --samples/--held-out, or allow augmentation)"
        )
    # too few studies: keep at least as many real ones for calibration as are held out
    n_held = held_out if len(paths) >= need else min(held_out, len(paths) // 2)
    cal_paths, held_paths = paths[: len(paths) - n_held], paths[len(paths) - n_held :]
    cal_paths = cal_paths[:samples]
    loaded: dict[Path, np.ndarray] = {}
    todo = cal_paths + held_paths
    for i, p in enumerate(todo):
        if progress:
            progress("load studies", i, len(todo))
        loaded[p] = _load(p, window)
    if progress:
        progress("load studies", len(todo), len(todo))
    cal_base = [(p.name, loaded[p]) for p in cal_paths]
    held_base = [(p.name, loaded[p]) for p in held_paths]
    cal_names, cal_vols, cal_aug = _fill(cal_base, samples)
    if held_base:
        held_names, held_vols, held_aug = _fill(held_base, held_out)
    else:  # one study only: held-out volumes are other augmentations of the calibration study
        held_names, held_vols, held_aug = _fill(cal_base, held_out + len(cal_base), offset=samples)
        held_names, held_vols = held_names[len(cal_base) :], held_vols[len(cal_base) :]
        notes.append(
            "no real study left for held-out evaluation: held-out volumes are augmentations of calibration "
            "studies, so the accuracy report is optimistic"
        )
    augmented = cal_aug + held_aug
    if len(paths) < need:
        notes.insert(
            0,
            f"only {len(paths)} studies for {samples} calibration + {held_out} held-out volumes: "
            f"{augmented} augmented volumes (flips/crops) were added",
        )
        log.warning("%s: %s", data_dir, notes[0])
    return CalibrationData(
        calibration=[v[None] for v in cal_vols],
        held_out=[v[None] for v in held_vols],
        calibration_names=cal_names,
        held_out_names=held_names,
        studies=len(paths),
        augmented=augmented,
        notes=notes,
    )
