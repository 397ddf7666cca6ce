"""A synthetic CT series for demos and tests: body ellipse, liver-like and tumour-like blobs, in HU.

    folder = write_phantom_series("phantom/")      # 40 slices of 128x128, CT Image Storage
    study = load_study(folder)

Deterministic: the same arguments give the same pixels and the same UIDs (``generate_uid`` seeded from
the arguments). The only patient attributes are ``PatientName = PatientID = "PHANTOM"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from m3d_edge.fileio import atomic_path

PIXEL_SPACING_MM = 2.5
SLICE_THICKNESS_MM = 5.0
ORIGIN_LPS = (-160.0, -160.0, -100.0)


def phantom_hu(slices: int = 40, rows: int = 128, cols: int = 128, seed: int = 0) -> np.ndarray:
    """The phantom volume in HU, int16 ``(z, y, x)``: air, fat rim, soft tissue, liver, tumour, spine."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, slices), np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij"
    )
    hu = np.full((slices, rows, cols), -1000.0)
    body = (x / 0.85) ** 2 + (y / 0.62) ** 2 < 1
    hu[body] = -100.0  # subcutaneous fat
    hu[(x / 0.78) ** 2 + (y / 0.55) ** 2 < 1] = 40.0  # soft tissue
    # patient's right is image left (LPS, column direction +x = patient left): liver on the image left
    liver = ((x + 0.35) / 0.33) ** 2 + ((y + 0.05) / 0.33) ** 2 + (z / 0.75) ** 2 < 1
    hu[liver] = 60.0
    tumour = ((x + 0.42) / 0.1) ** 2 + ((y + 0.1) / 0.1) ** 2 + ((z - 0.1) / 0.25) ** 2 < 1
    hu[tumour] = 10.0  # hypodense lesion inside the liver
    spine = (x / 0.09) ** 2 + ((y - 0.42) / 0.09) ** 2 < 1
    hu[spine] = 700.0
    kidney = ((x - 0.4) / 0.1) ** 2 + ((y - 0.2) / 0.15) ** 2 + (z / 0.5) ** 2 < 1
    hu[kidney] = 150.0
    hu[body] += rng.normal(0.0, 12.0, size=int(body.sum()))
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def ct_slice_dataset(
    hu: np.ndarray,
    *,
    position: tuple[float, float, float] | np.ndarray,
    orientation: tuple[float, ...] | np.ndarray = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float, float],
    instance_number: int,
    uids: dict[str, str],
    series_number: int = 1,
    description: str = "synthetic CT",
    patient: tuple[str, str] = ("PHANTOM^", "PHANTOM"),
    manufacturer: str = "m3d-edge phantom",
    image_type: tuple[str, ...] = ("DERIVED", "SECONDARY", "AXIAL"),
) -> Dataset:
    """One CT Image Storage slice: ``hu`` (rows, cols) stored as HU + 1024 with intercept -1024.

    ``spacing`` is (slice thickness, row spacing, column spacing) in mm; ``uids`` holds ``study``,
    ``series``, ``frame`` and ``sop``; ``patient`` is (PatientName, PatientID).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(uids["sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uids["sop"]
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.Manufacturer = manufacturer
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = instance_number
    ds.ImageType = list(image_type)
    ds.ImagePositionPatient = [f"{float(v):.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{float(v):.6f}" for v in orientation]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[2]:.6f}"]
    ds.SliceThickness = f"{spacing[0]:.4f}"
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(hu.shape[0]), int(hu.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = (hu.astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16).tobytes()
    return ds


def write_phantom_series(
    out_dir: Path | str, *, slices: int = 40, rows: int = 128, cols: int = 128, seed: int = 0
) -> Path:
    """Write the phantom as CT Image Storage files ``CT0001.dcm ..`` into ``out_dir``; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hu = phantom_hu(slices, rows, cols, seed)
    key = f"m3d-edge-phantom/{slices}x{rows}x{cols}/{seed}"
    uids = {name: generate_uid(entropy_srcs=[key, name]) for name in ("study", "series", "frame")}
    for k in range(slices):
        pos = (ORIGIN_LPS[0], ORIGIN_LPS[1], ORIGIN_LPS[2] + k * SLICE_THICKNESS_MM)
        ds = ct_slice_dataset(
            hu[k],
            position=pos,
            spacing=(SLICE_THICKNESS_MM, PIXEL_SPACING_MM, PIXEL_SPACING_MM),
            instance_number=k + 1,
            uids={**uids, "sop": generate_uid(entropy_srcs=[key, "instance", str(k)])},
            description="synthetic abdomen phantom",
        )
        ds.SliceLocation = f"{pos[2]:.4f}"
        ds.BodyPartExamined = "ABDOMEN"
        with atomic_path(out / f"CT{k + 1:04d}.dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    return out


def ct_like_volume(seed: int = 0) -> np.ndarray:
    """A deterministic CT-like [32, 256, 256] volume in [0, 1]: body ellipse, organs, mild noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, 32), np.linspace(-1, 1, 256), np.linspace(-1, 1, 256), indexing="ij"
    )
    vol = np.where((x / 0.85) ** 2 + (y / 0.65) ** 2 < 1, 0.45, 0.0)
    vol = vol + np.where(((x - 0.3) / 0.25) ** 2 + (y / 0.3) ** 2 + (z / 0.8) ** 2 < 1, 0.15, 0.0)
    vol = vol + np.where(((x + 0.35) / 0.2) ** 2 + ((y + 0.1) / 0.25) ** 2 < 1, -0.25, 0.0)
    vol = vol + 0.03 * rng.standard_normal(vol.shape)
    return np.clip(vol, 0, 1).astype(np.float32)
