"""Studies as they really come: unreadable files among good ones, and sizes declared by headers."""

from __future__ import annotations

import gzip
import shutil
import tracemalloc

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging import load_study
from m3d_edge.runtime.imaging.limits import ENV_MAX_VOXELS, max_voxels
from m3d_edge.runtime.imaging.phantom import write_phantom_series

MB = 1 << 20


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return write_phantom_series(tmp_path_factory.mktemp("series"), slices=10, rows=32, cols=32)


def _copy(series, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(series, folder)
    return folder


def _peak(fn, *args, **kwargs):
    """(result or exception, peak bytes traced while ``fn`` ran)."""
    tracemalloc.start()
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:
        out = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, peak


# ------------------------------------------------------------------------------------ unreadable files


def _corrupt_files(folder):
    good = (folder / "CT0001.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(good[:400])  # the header stops mid-element
    (folder / "garbage.dcm").write_bytes(good[:132] + bytes(range(256)) * 8)  # DICM, then noise
    (folder / "CT0003 copy.dcm").write_bytes((folder / "CT0003.dcm").read_bytes()[:-500])  # short pixels
    (folder / "notes.txt").write_text("not DICOM, ignored")


def test_unreadable_files_are_skipped_and_named(series, tmp_path):
    folder = _copy(series, tmp_path)
    _corrupt_files(folder)
    study = load_study(folder)
    assert study.hu.shape == (10, 32, 32)
    assert sorted(study.skipped_files) == ["CT0003 copy.dcm", "garbage.dcm", "truncated.dcm"]
    assert any("skipped 3 unreadable file(s)" in n and "pixel data truncated" in n for n in study.notes)


def test_incomplete_series_exits_3_naming_the_skipped_file(series, tmp_path, tiny_bundles):
    from test_cli import invoke

    folder = _copy(series, tmp_path)
    (folder / "CT0005.dcm").write_bytes((folder / "CT0005.dcm").read_bytes()[:300])
    with pytest.raises(StudyError, match=r"missing slices.*skipped 1 unreadable file\(s\): CT0005.dcm"):
        load_study(folder)
    r = invoke("run", tiny_bundles["phi3"], folder, "--task", "report", "-n", "2")
    assert r.exit_code == 3, r.output
    assert "CT0005.dcm" in r.stderr and "unexpected" not in r.stderr


def test_skipped_files_reach_the_result_and_stderr(series, tmp_path, tiny_bundles):
    import json

    from test_cli import invoke

    folder = _copy(series, tmp_path)
    _corrupt_files(folder)
    r = invoke("run", tiny_bundles["phi3"], folder, "--task", "report", "-n", "2", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert sorted(d["study"]["skipped_files"]) == ["CT0003 copy.dcm", "garbage.dcm", "truncated.dcm"]
    assert "skipped 3 unreadable file(s)" in r.stderr


# ------------------------------------------------------------------------------------ declared sizes


def test_voxel_limit_is_configurable(monkeypatch):
    assert max_voxels() == 512 * 512 * 512
    monkeypatch.setenv(ENV_MAX_VOXELS, "1000")
    assert max_voxels() == 1000 and max_voxels(5) == 5
    monkeypatch.setenv(ENV_MAX_VOXELS, "lots")
    with pytest.raises(StudyError, match="M3D_EDGE_MAX_VOXELS='lots'"):
        max_voxels()


def test_nifti_header_claiming_400_mb_in_a_tiny_file(tmp_path):
    """Measured: a 101-byte .nii.gz whose header claims 400 MB peaked at 541 MB."""
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header.set_data_shape((500, 500, 400))  # 100 M float32 voxels
    path = tmp_path / "liar.nii.gz"
    path.write_bytes(gzip.compress(img.header.binaryblock + b"\0" * 4))
    assert path.stat().st_size < 200
    err, peak = _peak(load_study, path)
    assert isinstance(err, StudyError) and "truncated NIfTI" in str(err) and str(path) in str(err)
    assert peak < 20 * MB  # refused before allocating (the header alone decides nothing)
    raw = tmp_path / "liar.nii"
    raw.write_bytes(img.header.binaryblock + b"\0" * 4)
    with pytest.raises(StudyError, match="truncated NIfTI"):
        load_study(raw)


def test_small_gzip_holding_more_voxels_than_the_limit(tmp_path, monkeypatch):
    """Measured: a valid 1.8 MB .nii.gz holding 419 MB of data peaked at 3.4 GB."""
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.int16), np.eye(4)), path)
    assert path.stat().st_size < 10_000
    monkeypatch.setenv(ENV_MAX_VOXELS, str(100_000))
    err, peak = _peak(load_study, path)
    assert isinstance(err, StudyError) and str(path) in str(err)
    assert "64 x 64 x 64 = 262,144 voxels, over the limit of 100,000" in str(err)
    assert peak < 2 * MB
    assert load_study(path, max_voxels=300_000).hu.shape == (64, 64, 64)  # the argument overrides


def test_dicom_slices_declaring_65535_squared(series, tmp_path):
    """Measured: 40 slices declaring 65535x65535 died with `unexpected MemoryError` (exit 1)."""
    folder = tmp_path / "huge"
    folder.mkdir()
    for k, f in enumerate(sorted(series.glob("*.dcm"))[:4]):
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 65535
        ds.save_as(folder / f"s{k}.dcm", enforce_file_format=True)
    err, peak = _peak(load_study, folder)
    assert isinstance(err, StudyError), err
    assert "s0.dcm: declares 1 x 65535 x 65535 = 4,294,836,225 voxels, over the limit" in str(err)
    assert peak < 20 * MB


def _deflated_with_private_tag(src, path, nbytes):
    ds = pydicom.dcmread(src)
    block = ds.private_block(0x0009, "M3D EDGE TEST", create=True)
    block.add_new(0x01, "OB", bytes(nbytes))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_deflated_dicom_with_bulk_private_data(series, tmp_path, monkeypatch):
    """Measured: a 531 KB Deflated DICOM with a 512 MB private tag peaked at 2.2 GB."""
    src = sorted(series.glob("*.dcm"))[0]
    ok = tmp_path / "ok"
    ok.mkdir()
    _deflated_with_private_tag(src, ok / "slice.dcm", 16 * MB)
    assert (ok / "slice.dcm").stat().st_size < 200_000
    study, peak = _peak(load_study, ok)
    assert not isinstance(study, Exception), study
    assert study.hu.shape == (1, 32, 32)
    assert peak < 8 * MB  # the 16 MB private value is never read
    big = tmp_path / "big"
    big.mkdir()
    _deflated_with_private_tag(src, big / "slice.dcm", 70 * MB)
    monkeypatch.setenv(ENV_MAX_VOXELS, str(1000))  # cap: 64 MB of headers + 4 bytes per voxel
    err, peak = _peak(load_study, big)
    assert isinstance(err, StudyError) and "slice.dcm" in str(err)
    assert "Deflated data set inflates to more than 64 MB" in str(err)
    assert peak < 8 * MB
