"""The study cache key is the study's content: a folder rewritten in place is not answered from the cache."""

from __future__ import annotations

import os
import shutil

import numpy as np

from m3d_edge.runtime.imaging.phantom import write_phantom_series
from m3d_edge.runtime.pipeline import _study_key


def _rewrite_in_place(src, dst) -> None:
    """Copy src's files over dst's (same names), then restore every mtime, the folder's included."""
    stamps = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    folder = dst.stat().st_mtime_ns
    for p in src.iterdir():
        shutil.copyfile(p, dst / p.name)
        os.utime(dst / p.name, ns=(stamps[p.name], stamps[p.name]))
    os.utime(dst, ns=(folder, folder))


def test_folder_rewritten_in_place_is_recomputed(pipelines, tmp_path):
    pipe = pipelines["phi3"]
    study = write_phantom_series(tmp_path / "ct", slices=34, rows=64, cols=64, seed=0)
    other = write_phantom_series(tmp_path / "other", slices=34, rows=64, cols=64, seed=5)
    first = pipe.prepare(study)
    embeds = first.image_embeds.copy()
    assert pipe.prepare(study) is first  # unchanged: cached
    _rewrite_in_place(other, study)
    second = pipe.prepare(study)
    assert second is not first and second.key != first.key
    assert not np.allclose(second.image_embeds, embeds)


def test_key_follows_content_not_path(tmp_path):
    a = write_phantom_series(tmp_path / "a", slices=34, rows=32, cols=32, seed=1)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert _study_key(a) == _study_key(b)
    f = tmp_path / "v.npy"
    np.save(f, np.zeros((2, 2), np.float32))
    k = _study_key(f)
    os.utime(f, ns=(0, 0))
    assert _study_key(f) == k
    np.save(f, np.ones((2, 2), np.float32))
    assert _study_key(f) != k
