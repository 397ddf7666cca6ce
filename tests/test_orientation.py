"""One voxel order for the model: the same study stored in any orientation gives the same answer and mask."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from m3d_edge.runtime.generate import SamplingParams
from m3d_edge.runtime.imaging import box_to_source, load_study, mask_to_source, preprocess
from m3d_edge.runtime.imaging.phantom import write_phantom_series

# stored voxel orders (NIfTI axis codes, RAS convention): DICOM's own, RAS (nibabel's canonical), permuted
ORDERS = [("L", "P", "S"), ("R", "A", "S"), ("A", "S", "R"), ("P", "I", "L")]


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("orient")
    series = write_phantom_series(root / "dicom", slices=14, rows=40, cols=48)
    study = load_study(series)
    data, affine = study.hu.transpose(2, 1, 0), study.geometry.affine_ras  # (i, j, k) as NIfTI stores it
    paths = {"dicom": series}
    for codes in ORDERS:
        t = ornt_transform(io_orientation(affine), axcodes2ornt(codes))
        img = nib.Nifti1Image(
            apply_orientation(data, t).astype(np.int16), affine @ inv_ornt_aff(t, data.shape)
        )
        assert nib.aff2axcodes(img.affine) == codes
        paths["".join(codes)] = root / f"{''.join(codes)}.nii.gz"
        nib.save(img, paths["".join(codes)])
    return paths


def _canonical(mask: np.ndarray, study) -> np.ndarray:
    """A stored (z, y, x) mask in RAS-canonical voxel order, for comparing across stored orientations."""
    img = nib.Nifti1Image(mask.transpose(2, 1, 0).astype(np.uint8), study.geometry.affine_ras)
    return np.asarray(nib.as_closest_canonical(img).dataobj)


def test_every_stored_orientation_gives_the_same_model_input(stored):
    inputs = {}
    for name, path in stored.items():
        volume, rec = preprocess(load_study(path))
        inputs[name] = volume
        assert rec.reoriented == (name not in ("dicom", "LPS"))
    for name, v in inputs.items():
        assert np.array_equal(v, inputs["dicom"]), name


def test_same_tokens_and_same_mask_on_the_source_grid(pipelines, stored):
    pipe = pipelines["phi3"]
    params = SamplingParams(logit_bias={pipe.seg_id: 40.0})
    rng = np.random.default_rng(0)
    blob = np.zeros((32, 256, 256), bool)  # an asymmetric model-grid mask, so a wrong flip would show
    blob[3:20, 40:150, 30:90] = True
    blob &= rng.random(blob.shape) > 0.3
    tokens, masks, blobs, boxes = {}, {}, {}, {}
    for name, path in stored.items():
        r = pipe.ask(path, task="segment", target="liver", max_new_tokens=4, sampling=params)
        assert r.mask is not None
        tokens[name] = r.tokens
        masks[name] = _canonical(mask_to_source(r.mask, r.record), r.study)
        blobs[name] = _canonical(mask_to_source(blob, r.record), r.study)
        sb = box_to_source((0.1, 0.2, 0.15, 0.6, 0.5, 0.4), r.record)
        corners = np.stack([sb.mm_min, sb.mm_max])
        boxes[name] = (corners.min(0), corners.max(0))
        assert r.study.hu.shape == tuple(r.record.source_shape)
    for name in stored:
        assert tokens[name] == tokens["dicom"], name
        assert np.array_equal(masks[name], masks["dicom"]), name
        assert np.array_equal(blobs[name], blobs["dicom"]), name
        assert 200 < blobs[name].sum() < blobs[name].size // 2
        np.testing.assert_allclose(boxes[name][0], boxes["dicom"][0], atol=1e-6)
        np.testing.assert_allclose(boxes[name][1], boxes["dicom"][1], atol=1e-6)


def test_record_round_trips_the_orientation(stored):
    from m3d_edge.runtime.imaging.preprocess import PreprocessRecord

    _, rec = preprocess(load_study(stored["ASR"]))
    back = PreprocessRecord.from_dict(rec.to_dict())
    assert back.perm == rec.perm and back.flip == rec.flip and back.reoriented
    assert rec.to_dict()["orientation"] == {"perm": list(rec.perm), "flip": list(rec.flip)}
