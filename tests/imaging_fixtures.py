"""Shared fixtures for the imaging tests: real data locations and a CT Image Storage series writer.

The chest CT ``lung1_image.nrrd`` (pyradiomics, BSD-3-Clause) is read from ``../shared/data/ct`` and
downsampled to a small series (64x64 pixels, 12 slices); tests skip when it is absent.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from m3d_edge.runtime.imaging.phantom import ct_slice_dataset

SHARED_CT = Path(__file__).resolve().parents[2] / "shared/data/ct"
LUNG_IMAGE = SHARED_CT / "lung1_image.nrrd"
LUNG_LABEL = SHARED_CT / "lung1_label.nrrd"

# the downsampled lung series: every 8th column/row, slices 26..37 (the lesion is in 32..34)
STRIDE = 8
Z0, NZ = 26, 12


def pydicom_test_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    try:
        p = get_testdata_file(name)
    except Exception as exc:  # pydicom-data may try to download
        pytest.skip(f"pydicom test file {name} unavailable: {exc}")
    if p is None or not Path(p).exists():
        pytest.skip(f"pydicom test file {name} unavailable (is pydicom-data installed?)")
    return Path(p)


def dicomdir_tests() -> Path:
    return pydicom_test_file("CT_small.dcm").parent / "dicomdirtests"


_LUNG_CACHE: dict[str, tuple] = {}


def lung_volume() -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, np.ndarray]:
    """(hu int16 (z, y, x) 12x64x64, spacing (z, y, x) mm, origin LPS mm, label uint8 (z, y, x))."""
    if not LUNG_IMAGE.exists():
        pytest.skip(f"real CT data absent: {LUNG_IMAGE}")
    nrrd = pytest.importorskip("nrrd", reason="pynrrd not installed")
    if "lung" not in _LUNG_CACHE:
        data, hdr = nrrd.read(str(LUNG_IMAGE))  # (x, y, z)
        lab = nrrd.read(str(LUNG_LABEL))[0] if LUNG_LABEL.exists() else np.zeros_like(data, np.uint8)
        sl = (slice(0, None, STRIDE), slice(0, None, STRIDE), slice(Z0, Z0 + NZ))
        hu = np.ascontiguousarray(data[sl].transpose(2, 1, 0)).astype(np.int16)
        label = np.ascontiguousarray(lab[sl].transpose(2, 1, 0)).astype(np.uint8)
        dirs = np.asarray(hdr["space directions"], dtype=np.float64)
        sp = np.linalg.norm(dirs, axis=1)  # x, y, z
        spacing = (float(sp[2]), float(sp[1] * STRIDE), float(sp[0] * STRIDE))
        origin = np.asarray(hdr["space origin"], dtype=np.float64) + Z0 * dirs[2]
        _LUNG_CACHE["lung"] = (hu, spacing, origin, label)
    hu, spacing, origin, label = _LUNG_CACHE["lung"]
    return hu.copy(), spacing, origin.copy(), label.copy()


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    origin: np.ndarray,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    description: str = "fixture CT",
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    positions: list[np.ndarray] | None = None,
    instance_numbers: list[int] | None = None,
    shuffle_seed: int | None = 0,
    rle: bool = False,
) -> list[Path]:
    """Write ``hu`` (z, y, x) as CT Image Storage files (stored = HU + 1024, intercept -1024).

    File names are random hex, written in shuffled order; ``positions`` overrides ImagePositionPatient per
    slice (for gaps, tilt, duplicates).
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    iop_a = np.asarray(iop, dtype=np.float64)
    normal = np.cross(iop_a[:3], iop_a[3:])
    nz = hu.shape[0]
    if positions is None:
        positions = [np.asarray(origin, dtype=np.float64) + k * spacing[0] * normal for k in range(nz)]
    if instance_numbers is None:
        instance_numbers = list(range(1, nz + 1))
    rng = random.Random(shuffle_seed)
    order = list(range(nz))
    if shuffle_seed is not None:
        rng.shuffle(order)
    paths = []
    for k in order:
        ds = ct_slice_dataset(
            hu[k],
            position=positions[k],
            orientation=iop_a,
            spacing=spacing,
            instance_number=instance_numbers[k],
            uids={"study": study_uid, "series": series_uid, "frame": frame_uid, "sop": generate_uid()},
            series_number=series_number,
            description=description,
            patient=("Fixture^Lung", "FIXTURE01"),
            manufacturer="fixture",
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        )
        if rle:
            ds.compress(RLELossless, encoding_plugin="pydicom")
        p = folder / f"{rng.getrandbits(48):012x}"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def read_back_uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
