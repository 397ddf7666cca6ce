"""Preprocessing: equals M3D's torch pipeline (min-max, CropForeground, F.interpolate trilinear)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging import PreprocessRecord, load_study, preprocess, resize_trilinear
from m3d_edge.runtime.imaging.preprocess import WINDOWS, crop_foreground_box

try:
    from imaging_fixtures import lung_volume, write_ct_series
except ImportError:  # pragma: no cover
    from tests.imaging_fixtures import lung_volume, write_ct_series

torch = pytest.importorskip("torch", reason="torch is needed to compare against F.interpolate")
F = torch.nn.functional


def _torch_resize(v: np.ndarray, shape=(32, 256, 256)) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def _ct_like(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (y**2 + x**2 < 0.7).astype(np.float32)
    v = -1024 + body * (1024 + 40 + 30 * np.sin(5 * z) + rng.normal(0, 20, shape))
    return v.astype(np.float32)


@pytest.mark.parametrize(
    "shape", [(20, 70, 90), (50, 300, 280), (1, 128, 128), (32, 256, 256), (33, 255, 513)]
)
def test_resize_equals_torch(shape):
    rng = np.random.default_rng(1)
    v = rng.random(shape, dtype=np.float32)
    np.testing.assert_allclose(resize_trilinear(v), _torch_resize(v), atol=1e-5, rtol=0)


def test_preprocess_equals_m3d_torch_pipeline():
    hu = _ct_like((40, 180, 200))
    hu[:, :3, :] = -3024  # padding outside the scan circle
    x, rec = preprocess(hu)
    # reference: clip [-1024, 3071], global min-max, CropForeground(x > 0), F.interpolate
    v = np.clip(hu, -1024, 3071)
    v = (v - v.min()) / (v.max() - v.min())
    nz = np.argwhere(v > 0)
    lo, hi = nz.min(0), nz.max(0) + 1
    ref = _torch_resize(v[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    assert x.shape == (1, 32, 256, 256) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], ref, atol=1e-5)
    assert rec.crop_start == tuple(int(a) for a in lo) and rec.crop_stop == tuple(int(a) for a in hi)
    assert rec.clip == (-1024.0, 3071.0)
    # padding does not change the scaling
    hu2 = hu.copy()
    hu2[:, :3, :] = -2000
    np.testing.assert_array_equal(preprocess(hu2)[0], x)


def test_windows_and_record_json():
    hu, _spacing, _origin, _ = lung_volume()
    for name, (lo, hi) in WINDOWS.items():
        x, rec = preprocess(hu.astype(np.float32), window=name)
        assert x.min() >= 0.0 and x.max() <= 1.0 + 1e-6
        assert rec.window == name and rec.clip == (lo, hi)
        back = PreprocessRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
        assert back.to_dict() == rec.to_dict()
    assert WINDOWS["abdomen"] == (-160.0, 240.0) and WINDOWS["lung"] == (-1350.0, 150.0)
    assert WINDOWS["bone"] == (-500.0, 1300.0) and WINDOWS["brain"] == (0.0, 80.0)
    with pytest.raises(StudyError, match="unknown window"):
        preprocess(hu.astype(np.float32), window="liver")


def test_lung_series_preprocess_vs_torch(tmp_path):
    hu, spacing, origin, _ = lung_volume()
    write_ct_series(tmp_path, hu, spacing, origin)
    study = load_study(tmp_path)
    x, rec = preprocess(study)
    v = np.clip(hu.astype(np.float32), -1024, 3071)
    v = (v - v.min()) / (v.max() - v.min())
    s, e = crop_foreground_box(v)
    np.testing.assert_allclose(x[0], _torch_resize(v[s[0] : e[0], s[1] : e[1], s[2] : e[2]]), atol=1e-5)
    assert rec.source_geometry.shape == hu.shape


def test_constant_volume_refused():
    with pytest.raises(StudyError, match="constant"):
        preprocess(np.full((8, 8, 8), -1024, np.float32))


def test_npy_identity(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.random((1, 32, 256, 256), dtype=np.float32)
    np.save(tmp_path / "a.npy", arr)
    np.save(tmp_path / "b.npy", arr[0])
    for name in ("a.npy", "b.npy"):
        study = load_study(tmp_path / name)
        assert study.kind == "npy" and study.preprocessed
        x, rec = preprocess(study)
        np.testing.assert_array_equal(x, arr)
        assert rec.identity and rec.crop_start == (0, 0, 0) and rec.crop_stop == (32, 256, 256)
    np.save(tmp_path / "hu.npy", (arr * 3000 - 1024)[0])
    with pytest.raises(StudyError, match=r"hu\.npy: values span .* normalized"):
        load_study(tmp_path / "hu.npy")
    np.save(tmp_path / "small.npy", arr[0, :16])
    with pytest.raises(StudyError, match=r"small\.npy: array of shape \(16, 256, 256\)"):
        load_study(tmp_path / "small.npy")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(StudyError, match=r"bad\.npy: cannot read"):
        load_study(tmp_path / "bad.npy")


def test_runtime_imaging_does_not_import_torch():
    code = (
        "import sys\n"
        "import m3d_edge.runtime.imaging as im\n"
        "import m3d_edge.runtime.imaging.dicom, m3d_edge.runtime.imaging.geometry\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
