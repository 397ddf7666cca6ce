"""Nothing accepted silently: precision fallbacks, thin studies, NRRD/MetaImage, files batch does not read."""

from __future__ import annotations

import gzip
import json
import zlib

import nibabel as nib
import numpy as np
import pytest
from test_cli import invoke

from m3d_edge.errors import BundleError, StudyError
from m3d_edge.runtime.imaging import load_study, preprocess
from m3d_edge.runtime.imaging.phantom import write_phantom_series
from m3d_edge.runtime.imaging.preprocess import MIN_SLICES

# ------------------------------------------------------------------------------------------ precision


def test_precision_without_variants_is_refused(tiny_bundles, tmp_path):
    from m3d_edge.runtime.pipeline import Pipeline

    bundle = tiny_bundles["phi3"]
    with pytest.raises(BundleError, match=r"no graph has a int8 variant .*m3d-edge calibrate"):
        Pipeline.open(bundle, precision="int8")
    npy = tmp_path / "case.npy"
    np.save(npy, __import__("conftest").ct_like_volume(4))
    r = invoke("run", bundle, npy, "--task", "report", "-n", "2", "--precision", "int8")
    assert r.exit_code == 4, r.output
    assert "no graph has a int8 variant" in r.stderr


def test_partial_precision_fallback_is_recorded_and_warned(tiny_bundles, tmp_path):
    """A bundle with INT8 vision only: the other graphs run FP32, said on stderr and in the result."""
    import shutil

    from m3d_edge.bundle import read_manifest
    from m3d_edge.runtime.pipeline import Pipeline

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["phi3"], bundle)
    manifest_path = bundle / "manifest.json"
    m = json.loads(manifest_path.read_text())
    vision = m["graphs"]["vision"]
    shutil.copy(bundle / vision["file"], bundle / "vision.int8.onnx")  # stands in for a QDQ variant
    digest = __import__("hashlib").sha256((bundle / "vision.int8.onnx").read_bytes()).hexdigest()
    vision.setdefault("variants", {})["int8"] = {
        "file": "vision.int8.onnx",
        "sha256": {"vision.int8.onnx": digest},
    }
    manifest_path.write_text(json.dumps(m))
    read_manifest(bundle, verify=False)
    pipe = Pipeline.open(bundle, precision="int8", verify=False)
    assert pipe.precisions["vision"] == "int8"
    assert pipe.precision_fallbacks["decoder"] == "fp32 (no int8 variant)"
    prov = pipe.provenance()
    assert prov["precision_requested"] == "int8" and "decoder" in prov["precision_fallback"]


# ------------------------------------------------------------------------------------------ thin studies


def test_studies_too_thin_to_be_a_volume_are_refused(tmp_path, tiny_bundles):
    one = write_phantom_series(tmp_path / "one", slices=1, rows=32, cols=32)
    with pytest.raises(StudyError, match=f"too thin to be a volume \\(at least {MIN_SLICES} voxels"):
        preprocess(load_study(one))
    r = invoke("run", tiny_bundles["phi3"], one, "--task", "report", "-n", "2")
    assert r.exit_code == 3 and "too thin to be a volume" in r.stderr
    ok = write_phantom_series(tmp_path / "ok", slices=MIN_SLICES, rows=32, cols=32)
    assert preprocess(load_study(ok))[0].shape == (1, 32, 256, 256)


# ------------------------------------------------------------------------------------------ NRRD, MetaImage


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The phantom as DICOM, and its (z, y, x) HU and LPS affine."""
    series = write_phantom_series(tmp_path_factory.mktemp("ref"), slices=10, rows=24, cols=28)
    return load_study(series)


def _write_nrrd(path, study, space="left-posterior-superior", encoding="gzip"):
    import nrrd

    affine = study.geometry.affine
    sign = np.array([-1.0, -1.0, 1.0]) if space == "right-anterior-superior" else np.ones(3)
    header = {
        "space": space,
        "space directions": (affine[:3, :3] * sign[:, None]).T,
        "space origin": affine[:3, 3] * sign,
        "encoding": encoding,
    }
    nrrd.write(str(path), study.hu.transpose(2, 1, 0).astype(np.int16), header)
    return path


def _write_mha(path, study, compressed=True, data_file=None):
    a = study.geometry.affine
    sp = np.linalg.norm(a[:3, :3], axis=0)
    tm = (a[:3, :3] / sp).T.ravel()  # row i: direction of axis i
    raw = study.hu.astype("<i2").tobytes()
    body = zlib.compress(raw) if compressed else raw
    lines = [
        "ObjectType = Image",
        "NDims = 3",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        f"CompressedData = {compressed}",
        *([f"CompressedDataSize = {len(body)}"] if compressed else []),
        "TransformMatrix = " + " ".join(f"{v:g}" for v in tm),
        "Offset = " + " ".join(f"{v:g}" for v in a[:3, 3]),
        "ElementSpacing = " + " ".join(f"{v:g}" for v in sp),
        "DimSize = " + " ".join(str(v) for v in study.hu.shape[::-1]),
        "ElementType = MET_SHORT",
        f"ElementDataFile = {data_file or 'LOCAL'}",
    ]
    head = ("\n".join(lines) + "\n").encode()
    if data_file:
        path.write_bytes(head)
        (path.parent / data_file).write_bytes(body)
    else:
        path.write_bytes(head + body)
    return path


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior"])
@pytest.mark.parametrize("encoding", ["gzip", "raw"])
def test_nrrd_reads_as_the_same_study(reference, tmp_path, space, encoding):
    study = load_study(_write_nrrd(tmp_path / "ct.nrrd", reference, space, encoding))
    assert study.kind == "nrrd" and np.array_equal(study.hu, reference.hu)
    np.testing.assert_allclose(study.geometry.affine, reference.geometry.affine, atol=1e-9)
    assert np.array_equal(preprocess(study)[0], preprocess(reference)[0])


@pytest.mark.parametrize("compressed", [True, False])
def test_metaimage_reads_as_the_same_study(reference, tmp_path, compressed):
    for path, data_file in ((tmp_path / "ct.mha", None), (tmp_path / "ct.mhd", "ct.raw")):
        study = load_study(_write_mha(path, reference, compressed, data_file))
        assert study.kind == "metaimage" and np.array_equal(study.hu, reference.hu)
        np.testing.assert_allclose(study.geometry.affine, reference.geometry.affine, atol=1e-6)


def test_real_ct_nrrd_matches_its_header():
    from imaging_fixtures import LUNG_IMAGE

    if not LUNG_IMAGE.exists():
        pytest.skip(f"real CT data absent: {LUNG_IMAGE}")
    study = load_study(LUNG_IMAGE)
    assert study.hu.shape == (48, 512, 512) and study.geometry.spacing == (5.0, 0.5703125, 0.5703125)
    np.testing.assert_allclose(study.geometry.affine[:3, 3], [-146.0, -325.0, -777.5])


def test_nrrd_and_metaimage_refusals(reference, tmp_path, monkeypatch):
    nrrd_path = _write_nrrd(tmp_path / "ct.nrrd", reference, encoding="raw")
    short = tmp_path / "short.nrrd"
    short.write_bytes(nrrd_path.read_bytes()[:-100])
    with pytest.raises(StudyError, match="truncated NRRD"):
        load_study(short)
    mha = _write_mha(tmp_path / "ct.mha", reference, compressed=True)
    bomb = tmp_path / "bomb.mha"  # a small file that inflates to far more than DimSize declares
    head = mha.read_bytes().split(b"ElementDataFile = LOCAL\n")[0] + b"ElementDataFile = LOCAL\n"
    bomb.write_bytes(head + zlib.compress(bytes(50_000_000)))
    with pytest.raises(StudyError, match="inflates to more than"):
        load_study(bomb)
    escape = tmp_path / "sub" / "escape.mhd"
    escape.parent.mkdir()
    escape.write_bytes(head.replace(b"LOCAL", b"../ct.mha"))
    with pytest.raises(StudyError, match="not one file in the header's folder"):
        load_study(escape)
    monkeypatch.setenv("M3D_EDGE_MAX_VOXELS", "1000")
    with pytest.raises(StudyError, match="over the limit of 1,000"):
        load_study(nrrd_path)
    with pytest.raises(StudyError, match="over the limit of 1,000"):
        load_study(mha)


# ------------------------------------------------------------------------------------------ batch


def test_batch_reads_nrrd_and_mha_and_reports_what_it_ignores(reference, tmp_path, tiny_bundles):
    root = tmp_path / "studies"
    root.mkdir()
    _write_nrrd(root / "a.nrrd", reference)
    _write_mha(root / "b.mha", reference)
    nib.save(nib.Nifti1Image(reference.hu.transpose(2, 1, 0).astype(np.int16), reference.geometry.affine_ras),
             root / "c.nii.gz")  # fmt: skip
    (root / "notes.txt").write_text("x")
    (root / "scan.png").write_bytes(gzip.compress(b"x"))
    out = tmp_path / "out"
    r = invoke("batch", tiny_bundles["phi3"], root, "--task", "report", "-n", "2", "--out", out)
    assert r.exit_code == 0, r.output
    assert "skipped 2 file(s) that are not studies: notes.txt, scan.png" in r.stderr
    summary = json.loads((out / "batch.json").read_text())
    assert summary["ok"] == 3 and summary["not_studies"] == ["notes.txt", "scan.png"]
    tokens = {n: json.loads((out / n / "result.json").read_text())["tokens"] for n in "abc"}
    assert tokens["a"] == tokens["b"] == tokens["c"]  # one study, three formats: one answer
