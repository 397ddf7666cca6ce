"""The synthetic CT phantom: a valid CT series that load_study reads, deterministic, no patient data."""

from __future__ import annotations

import numpy as np
import pydicom

from m3d_edge.runtime.imaging import load_study, preprocess
from m3d_edge.runtime.imaging.phantom import phantom_hu, write_phantom_series


def test_phantom_loads_with_expected_geometry(tmp_path):
    folder = write_phantom_series(tmp_path / "a", slices=20, rows=64, cols=48)
    study = load_study(folder)
    assert study.kind == "dicom" and study.hu.shape == (20, 64, 48)
    assert np.allclose(study.geometry.spacing, (5.0, 2.5, 2.5))
    assert study.hu.min() == -1000 and study.hu.max() > 300  # air and the spine
    assert np.array_equal(study.hu, phantom_hu(20, 64, 48).astype(np.float32))
    volume, record = preprocess(study)
    assert volume.shape == (1, 32, 256, 256) and record.crop_start != (0, 0, 0)  # the air is cropped


def test_phantom_is_deterministic_and_anonymous(tmp_path):
    a = write_phantom_series(tmp_path / "a", slices=4, rows=32, cols=32, seed=3)
    b = write_phantom_series(tmp_path / "b", slices=4, rows=32, cols=32, seed=3)
    c = write_phantom_series(tmp_path / "c", slices=4, rows=32, cols=32, seed=4)
    files = sorted(a.iterdir())
    assert [f.name for f in files] == ["CT0001.dcm", "CT0002.dcm", "CT0003.dcm", "CT0004.dcm"]
    da, db, dc = (pydicom.dcmread(d / "CT0002.dcm") for d in (a, b, c))
    assert da.SOPInstanceUID == db.SOPInstanceUID != dc.SOPInstanceUID
    assert da.SeriesInstanceUID == db.SeriesInstanceUID
    assert da.PixelData == db.PixelData
    assert da.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert str(da.PatientName).rstrip("^") == "PHANTOM" and da.PatientID == "PHANTOM"
    assert float(da.RescaleIntercept) == -1024 and da.ImageOrientationPatient == [1, 0, 0, 0, 1, 0]
