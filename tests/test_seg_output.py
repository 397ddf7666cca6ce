"""DICOM SEG from real-world series: absent Type 2 attributes, SNOMED codes, colours, asked-for outputs."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from test_outputs import make_result

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging import load_study, preprocess
from m3d_edge.runtime.imaging.phantom import write_phantom_series
from m3d_edge.runtime.outputs import write_outputs

DROPPED = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID", "AccessionNumber")


@pytest.fixture(scope="module")
def deidentified(tmp_path_factory):
    """A phantom series whose files lack the Type 2 attributes de-identification tools drop."""
    folder = write_phantom_series(tmp_path_factory.mktemp("deid"), slices=8, rows=32, cols=32)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for k in DROPPED:
            delattr(ds, k)
        ds.save_as(f, enforce_file_format=True)
    study = load_study(folder)
    volume, record = preprocess(study)
    return study, volume[0], record


def _segment(seg):
    return seg.SegmentSequence[0]


def test_seg_written_without_type2_attributes(deidentified, tmp_path):
    study, volume, record = deidentified
    assert all(k not in study.source_datasets[0] for k in DROPPED)
    r = make_result(study, record, volume)
    paths = write_outputs(r, tmp_path)
    assert set(paths) == {"json", "nifti", "seg"}
    seg = pydicom.dcmread(paths["seg"])
    for k in DROPPED:
        assert k in seg and str(seg[k].value) == "", k
    assert all(k not in study.source_datasets[0] for k in DROPPED)  # the study's headers are untouched
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", paths["seg"]], capture_output=True, text=True)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors


@pytest.mark.parametrize(
    "label,category,typ,laterality",
    [
        ("liver", "91723000", "10200004", None),
        ("left kidney", "91723000", "64033007", "7771000"),
        ("inferior vena cava", "91723000", "64131007", None),
        ("liver tumor", "49755003", "108369006", None),
    ],
)
def test_segments_carry_snomed_codes_and_a_colour(deidentified, tmp_path, label, category, typ, laterality):
    study, volume, record = deidentified
    r = make_result(study, record, volume)
    r.target = label
    seg = pydicom.dcmread(write_outputs(r, tmp_path)["seg"])
    s = _segment(seg)
    assert s.SegmentLabel == label
    assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == category
    assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == typ
    assert s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert len(s.RecommendedDisplayCIELabValue) == 3
    if laterality:
        assert s.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == laterality
    else:
        assert "SegmentedPropertyTypeModifierCodeSequence" not in s
    if label == "liver tumor":
        assert s.AnatomicRegionSequence[0].CodeValue == "10200004"


def test_asked_for_seg_that_cannot_be_written_fails_loudly(tmp_path):
    r = make_result(volume=np.zeros((32, 256, 256), np.float32))  # an array: no DICOM source
    with pytest.raises(StudyError, match="DICOM SEG not written: the study is not DICOM"):
        write_outputs(r, tmp_path, formats=("json", "nifti", "seg"))
    assert not (tmp_path / "result.json").exists()  # no JSON: the result is not complete on disk
    # asking for what applies (the default) is not an error: the SEG does not apply to an array
    assert set(write_outputs(r, tmp_path / "auto")) == {"json", "nifti"}


def test_batch_with_an_unwritable_seg_exits_non_zero(tiny_bundles, tmp_path):
    from test_cli import invoke

    root = tmp_path / "studies"
    root.mkdir()
    np.save(root / "a.npy", __import__("conftest").ct_like_volume(3))
    out = tmp_path / "out"
    args = ("batch", tiny_bundles["phi3"], root, "--task", "segment", "--target", "liver", "--force-seg")
    r = invoke(*args, "-n", "2", "--out", out, "--format", "json,seg")
    assert r.exit_code == 10, r.output
    err = json.loads((out / "errors.jsonl").read_text().splitlines()[0])
    assert "DICOM SEG not written" in err["error"] and err["exit_code"] == 3
    r = invoke(*args, "-n", "2", "--out", tmp_path / "out2")  # default formats: what applies
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out2" / "a" / "result_mask.nii.gz").is_file()
