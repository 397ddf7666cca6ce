"""DICOM loading against real files: pydicom's own CT series, pydicom-data, and series built from a real chest CT."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging import load_study, preprocess
from m3d_edge.runtime.imaging.dicom_series import scan_folder

try:
    from imaging_fixtures import dicomdir_tests, lung_volume, pydicom_test_file, write_ct_series
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.imaging_fixtures import dicomdir_tests, lung_volume, pydicom_test_file, write_ct_series


# ------------------------------------------------------------------------------------ pydicom's files


def test_ct2_irregular_refused_with_gap_message():
    folder = dicomdir_tests() / "77654033" / "CT2"
    with pytest.raises(StudyError) as ei:
        load_study(folder)
    msg = str(ei.value)
    assert "series 2" in msg and "missing slices" in msg and "202.50 mm gap" in msg
    assert "\n" not in msg


def test_ct2_accepted_with_resample():
    study = load_study(dicomdir_tests() / "77654033" / "CT2", allow_resample=True)
    assert study.resampled
    assert study.hu.shape == (165, 16, 16)
    assert study.geometry.spacing[0] == pytest.approx(205.0 / 164, rel=1e-6)
    # the last three original slices are on the new grid: values preserved exactly
    raw = [pydicom.dcmread(p) for p in sorted((dicomdir_tests() / "77654033" / "CT2").iterdir())]
    raw.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    last = raw[-1].pixel_array * float(raw[-1].RescaleSlope) + float(raw[-1].RescaleIntercept)
    np.testing.assert_allclose(study.hu[-1], last, atol=1e-3)


def test_ct5n_descending_files_sorted_ascending():
    folder = dicomdir_tests() / "98892001" / "CT5N"
    study = load_study(folder)
    assert study.hu.shape == (5, 16, 16)
    zs = []
    for uid in study.source_sop_instance_uids:
        ds = next(d for d in study.source_datasets if d.SOPInstanceUID == uid)
        zs.append(float(ds.ImagePositionPatient[2]))
    assert zs == sorted(zs) and zs[0] == pytest.approx(-1.2375)
    assert study.geometry.affine[2, 2] == pytest.approx(2.5)
    assert study.geometry.affine[2, 3] == pytest.approx(-1.2375)
    # pixels follow the positions, not the files
    first = pydicom.dcmread(folder / "3353")
    np.testing.assert_allclose(
        study.hu[0], first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    )


def test_ct2n_localizers_dropped():
    infos = scan_folder(dicomdir_tests() / "98892001" / "CT2N")
    assert len(infos) == 1 and not infos[0].eligible and infos[0].n_localizers == 2
    with pytest.raises(StudyError, match="LOCALIZER"):
        load_study(dicomdir_tests() / "98892001" / "CT2N")
    # in the parent folder the scout series is listed but the axial series is chosen
    infos = scan_folder(dicomdir_tests() / "98892001")
    chosen = [s for s in infos if s.chosen]
    assert len(chosen) == 1 and chosen[0].series_number == 5
    study = load_study(dicomdir_tests() / "98892001")
    assert study.series_number == 5 and study.hu.shape[0] == 5


def test_dicomdir_and_non_ct_skipped():
    infos = scan_folder(dicomdir_tests())  # DICOMDIR files, MR series, CT series
    assert all(s.series_instance_uid for s in infos)
    assert not any(s.eligible for s in infos if s.modality == "MR")
    study = load_study(dicomdir_tests())
    assert study.kind == "dicom" and study.hu.shape[0] == 5  # CT2 has 4, CT5N has 5 slices


def test_ct_small_single_slice():
    study = load_study(pydicom_test_file("CT_small.dcm"))
    assert study.hu.shape == (1, 128, 128)
    ds = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    np.testing.assert_allclose(
        study.hu[0], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    )
    with pytest.raises(StudyError, match="too thin to be a volume"):  # read, but not stretched 32x
        preprocess(study)


@pytest.mark.parametrize("name", ["693_J2KR.dcm", "693_J2KI.dcm"])
def test_jpeg2000_slice(name):
    study = load_study(pydicom_test_file(name))
    ref = load_study(pydicom_test_file("693_UNCR.dcm" if name.endswith("R.dcm") else "693_UNCI.dcm"))
    assert study.hu.shape == (1, 512, 512)
    np.testing.assert_array_equal(study.hu, ref.hu)
    assert study.hu.min() < -1000


def test_enhanced_ct_functional_group_rescale():
    path = pydicom_test_file("eCT_Supplemental.dcm")
    study = load_study(path)
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float32)  # (2, 512, 512), stored values
    # rescale intercept -1024 lives only in the functional groups
    assert "RescaleIntercept" not in ds
    assert study.hu.shape == (2, 512, 512)
    # frames sorted along the normal (0, 0, -1): z = -149 (frame 2) comes before z = -159 (frame 1)
    assert study.source_frame_numbers == [2, 1]
    np.testing.assert_allclose(study.hu[0], raw[1] - 1024.0)
    np.testing.assert_allclose(study.hu[1], raw[0] - 1024.0)
    assert study.hu.min() == -1024.0
    np.testing.assert_allclose(study.geometry.affine[:3, 3], [99.5, -301.5, -149.0])
    np.testing.assert_allclose(study.geometry.affine[:3, 2], [0, 0, -10.0])


def test_missing_plugin_message(tmp_path):
    """With the JPEG 2000 plugin hidden, decoding fails with a message naming the file and the plugin."""
    path = pydicom_test_file("693_J2KR.dcm")
    code = (
        "from pydicom.pixels.decoders import JPEG2000LosslessDecoder as D\n"
        "for p in D.available_plugins: D.remove_plugin(p)\n"
        "import m3d_edge.runtime.imaging.dicom as dm\n"
        "dm._module_available = lambda name: name != 'openjpeg'\n"
        "from m3d_edge.runtime.imaging import load_study\n"
        "from m3d_edge.errors import StudyError\n"
        f"try:\n    load_study({str(path)!r})\nexcept StudyError as e:\n    print('MSG:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "MSG:" in out.stdout, out.stderr
    msg = out.stdout.split("MSG:", 1)[1].strip()
    assert "693_J2KR.dcm" in msg and "pylibjpeg-openjpeg" in msg and "JPEG 2000" in msg


def test_not_dicom_and_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(StudyError, match="no DICOM files"):
        load_study(tmp_path)
    with pytest.raises(StudyError, match="no such file"):
        load_study(tmp_path / "absent")
    with pytest.raises(StudyError, match="not a DICOM folder or file"):
        load_study(tmp_path / "notes.txt")


# ------------------------------------------------------------------------------------ series from real CT


def test_lung_series_shuffled_reversed_instance_numbers(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    nz = hu.shape[0]
    write_ct_series(tmp_path, hu, spacing, origin, instance_numbers=list(range(nz, 0, -1)), shuffle_seed=3)
    (tmp_path / "README.txt").write_text("not dicom")
    (tmp_path / "sub").mkdir()
    study = load_study(tmp_path)
    np.testing.assert_array_equal(study.hu, hu.astype(np.float32))
    np.testing.assert_allclose(study.geometry.spacing, spacing, rtol=1e-5)
    np.testing.assert_allclose(study.geometry.affine[:3, 3], origin, atol=1e-3)
    np.testing.assert_allclose(
        np.diag(study.geometry.affine)[:3], [spacing[2], spacing[1], spacing[0]], rtol=1e-5
    )
    assert study.kind == "dicom" and len(study.source_sop_instance_uids) == nz


def test_lung_series_rle_compressed(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    paths = write_ct_series(tmp_path, hu, spacing, origin, rle=True)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    study = load_study(tmp_path)
    np.testing.assert_array_equal(study.hu, hu.astype(np.float32))


def test_lung_gantry_tilt_refused(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    # axial images, but each slice shifted 2 mm in y per 5 mm step: a ~21.8 degree tilt
    pos = [origin + np.array([0.0, 2.0 * k, spacing[0] * k]) for k in range(hu.shape[0])]
    write_ct_series(tmp_path, hu, spacing, origin, positions=pos, series_number=7)
    with pytest.raises(StudyError) as ei:
        load_study(tmp_path)
    assert "series 7" in str(ei.value) and "gantry tilt" in str(ei.value) and "21.8 degrees" in str(ei.value)
    with pytest.raises(StudyError, match="gantry tilt"):
        load_study(tmp_path, allow_resample=True)


def test_lung_gap_refused_then_resampled(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    keep = [k for k in range(hu.shape[0]) if k not in (5, 6)]
    pos = [origin + np.array([0.0, 0.0, spacing[0] * k]) for k in keep]
    write_ct_series(tmp_path, hu[keep], spacing, origin, positions=pos, series_number=3)
    with pytest.raises(StudyError) as ei:
        load_study(tmp_path)
    msg = str(ei.value)
    assert "series 3" in msg and "missing slices" in msg and "15.00 mm gap" in msg and "about 2 slices" in msg
    study = load_study(tmp_path, allow_resample=True)
    assert study.resampled and study.hu.shape == hu.shape
    np.testing.assert_allclose(study.geometry.spacing[0], spacing[0], rtol=1e-6)
    for k in keep:  # original slices unchanged
        np.testing.assert_allclose(study.hu[k], hu[k], atol=1e-3)
    # missing slices are linear between their neighbours
    np.testing.assert_allclose(study.hu[5], hu[4] * 2 / 3 + hu[7] / 3, atol=1e-2)


def test_lung_duplicate_refused(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    idx = [*range(hu.shape[0]), 4]
    pos = [origin + np.array([0.0, 0.0, spacing[0] * k]) for k in idx]
    write_ct_series(tmp_path, hu[idx], spacing, origin, positions=pos, series_number=4)
    with pytest.raises(StudyError) as ei:
        load_study(tmp_path, allow_resample=True)
    assert "series 4" in str(ei.value) and "duplicate slices" in str(ei.value)


def test_lung_two_series_selection(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    study_uid = pydicom.uid.generate_uid()
    big_uid, small_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    write_ct_series(tmp_path / "a", hu, spacing, origin, study_uid=study_uid, series_uid=big_uid,
                    series_number=2, description="Thorax 5mm")  # fmt: skip
    write_ct_series(tmp_path / "b", hu[:6], spacing, origin, study_uid=study_uid, series_uid=small_uid,
                    series_number=9, description="Lung subset", shuffle_seed=5)  # fmt: skip
    # a sagittal series with more images must not win the default choice
    sag = np.ascontiguousarray(hu.transpose(2, 0, 1)[:, :, :])[:20]
    write_ct_series(tmp_path / "c", sag, (spacing[2], spacing[0], spacing[1]), origin, study_uid=study_uid,
                    series_number=11, iop=(0, 1, 0, 0, 0, -1), description="Sagittal")  # fmt: skip
    infos = scan_folder(tmp_path)
    assert len(infos) == 3
    chosen = [s for s in infos if s.chosen]
    assert [s.series_number for s in chosen] == [2]
    assert "most slices" in chosen[0].reason
    assert {s.series_number: s.orientation for s in infos} == {2: "axial", 9: "axial", 11: "sagittal"}
    assert load_study(tmp_path).series_instance_uid == big_uid
    assert load_study(tmp_path, series=small_uid).hu.shape[0] == 6
    assert load_study(tmp_path, series="9").series_instance_uid == small_uid
    assert load_study(tmp_path, series="subset").series_instance_uid == small_uid
    assert load_study(tmp_path, series="11").hu.shape == (20, 12, 64)
    with pytest.raises(StudyError, match="no CT series matches 'nothing'"):
        load_study(tmp_path, series="nothing")
    # messages carry no patient identifiers
    with pytest.raises(StudyError) as ei:
        load_study(tmp_path, series="nothing")
    assert "Fixture" not in str(ei.value) and "FIXTURE01" not in str(ei.value)


def test_non_image_objects_ignored(tmp_path):
    """A SEG written next to the CT series is listed but never chosen."""
    from m3d_edge.runtime.imaging import write_dicom_seg

    hu, spacing, origin, _label = lung_volume()
    write_ct_series(tmp_path / "ct", hu, spacing, origin, series_number=2)
    study = load_study(tmp_path)
    mask = np.zeros(hu.shape, np.uint8)
    mask[4:8, 20:30, 20:30] = 1
    write_dicom_seg(mask, study, tmp_path / "seg" / "out.dcm", "lesion", "bundle-x", "1.0")
    infos = scan_folder(tmp_path)
    seg = [s for s in infos if s.modality == "SEG"]
    assert len(seg) == 1 and not seg[0].eligible and "not a CT image series" in seg[0].reason
    assert load_study(tmp_path).series_instance_uid == study.series_instance_uid


def test_junk_files_skipped_and_truncated_pixels_named(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    paths = write_ct_series(tmp_path, hu, spacing, origin)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "junk").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 2)
    (tmp_path / "DICOMDIR").write_bytes(b"xx")
    (tmp_path / "half_header").write_bytes(paths[0].read_bytes()[:300])
    assert load_study(tmp_path).hu.shape == hu.shape
    paths[1].write_bytes(paths[1].read_bytes()[:-1000])
    with pytest.raises(StudyError) as ei:
        load_study(tmp_path)
    # the truncated slice is skipped and named; the series then has a gap and is refused (exit 3)
    assert "missing slices" in str(ei.value) and ei.value.exit_code == 3
    assert f"{paths[1].name} (ValueError: pixel data truncated" in str(ei.value)
