"""write_outputs and the result JSON schema: box in three coordinate systems, NIfTI, DICOM SEG, atomicity."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from m3d_edge.errors import PromptError
from m3d_edge.runtime.imaging import box_to_source, load_study, preprocess
from m3d_edge.runtime.imaging.phantom import write_phantom_series
from m3d_edge.runtime.outputs import output_names, segment_label, write_outputs
from m3d_edge.runtime.result import RESULT_SCHEMA, Result

BOX = (0.25, 0.3, 0.2, 0.6, 0.7, 0.5)


@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory):
    study = load_study(write_phantom_series(tmp_path_factory.mktemp("ph"), slices=10, rows=40, cols=40))
    volume, record = preprocess(study)
    return study, volume[0], record


def make_result(study=None, record=None, volume=None, *, mask=True, box=BOX, task="segment") -> Result:
    m = None
    if mask:
        m = np.zeros((32, 256, 256), bool)
        m[8:20, 100:160, 60:140] = True
    return Result(
        question="Can you segment the liver in this image? Please output the mask.",
        task=task,
        text="[SEG]",
        tokens=[32014],
        stop_reason="eos",
        box=box,
        mask=m,
        timings={"vision": 0.5, "prefill": 0.1, "decode_steps": [0.01, 0.03], "total": 1.0},
        provenance={"bundle_id": "m3d-phi3-test", "producer": "m3d-edge 0.1.0", "precision": {}},
        volume=volume,
        study=study,
        record=record,
    )


def test_schema_with_dicom_study(dicom_study, tmp_path):
    study, volume, record = dicom_study
    r = make_result(study, record, volume)
    paths = write_outputs(r, tmp_path, stem="case")
    assert set(paths) == {"json", "nifti", "seg"}
    d = json.loads((tmp_path / "case.json").read_text())
    assert d["schema"] == RESULT_SCHEMA
    assert d["study"]["series_instance_uid"] == study.series_instance_uid
    assert d["study"]["spacing_zyx_mm"] == [5.0, 2.5, 2.5]
    sb = box_to_source(BOX, record)
    box = d["box"]
    assert box["normalized"] == list(BOX)
    assert box["source_voxels"] == {"min": list(sb.source_min), "max": list(sb.source_max)}
    assert box["patient_mm_lps"]["center"] == pytest.approx(list(sb.mm_center))
    assert d["timings"]["decode_steps"] == 2 and d["timings"]["decode_tokens_per_s"] == pytest.approx(50.0)
    assert d["timings"]["seg_decoder"] is None
    assert d["mask"]["files"] == {"nifti": "case_mask.nii.gz", "seg": "case_seg.dcm"}
    assert d["mask"]["voxels"] == int(r.mask.sum()) and d["mask"]["source_voxels"] > 0
    assert d["target"] == "liver"
    text = (tmp_path / "case.json").read_text()
    assert "PHANTOM" not in text and str(study.source_path) not in text

    img = nib.load(tmp_path / "case_mask.nii.gz")
    assert img.shape == (40, 40, 10)  # (x, y, z) of the source series
    assert np.allclose(img.affine, study.geometry.affine_ras)
    assert int(np.asarray(img.dataobj).sum()) == d["mask"]["source_voxels"]
    seg = pydicom.dcmread(tmp_path / "case_seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    assert not list(tmp_path.glob(".*partial*"))


def test_array_input_uses_the_model_grid(tmp_path):
    r = make_result(volume=np.zeros((32, 256, 256), np.float32))
    paths = write_outputs(r, tmp_path)
    assert set(paths) == {"json", "nifti"}
    d = json.loads((tmp_path / "result.json").read_text())
    assert d["study"]["kind"] == "array" and d["study"]["series_instance_uid"] is None
    assert d["box"]["patient_mm_lps"] is None  # no geometry: voxels only
    assert d["box"]["source_voxels"] == d["box"]["grid_voxels"]
    img = nib.load(tmp_path / "result_mask.nii.gz")
    assert img.shape == (256, 256, 32)
    assert int(np.asarray(img.dataobj).sum()) == int(r.mask.sum())


def test_no_mask_no_box_and_formats(tmp_path):
    r = make_result(mask=False, box=None, task="report")
    assert write_outputs(r, tmp_path, formats=("json",)) == {"json": str(tmp_path / "result.json")}
    d = json.loads((tmp_path / "result.json").read_text())
    assert d["box"] is None and d["mask"] is None and d["target"] is None
    with pytest.raises(PromptError):
        write_outputs(r, tmp_path, formats=("png",))
    with pytest.raises(PromptError):
        write_outputs(r, tmp_path, stem="../evil")


def test_segment_label_and_names():
    r = make_result(mask=False)
    assert segment_label(r) == "liver"
    r.task, r.question = None, "free question"
    assert segment_label(r) == "free question"
    r.target = "spleen"
    assert segment_label(r) == "spleen"
    assert output_names("x") == {
        "json": "x.json",
        "nifti": "x_mask.nii.gz",
        "seg": "x_seg.dcm",
        "sr": "x_sr.dcm",
    }
