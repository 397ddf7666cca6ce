"""Shared fixtures: tiny checkpoints and bundles of both variants, built once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m3d_edge.runtime.imaging import phantom

FAMILIES = ("phi3", "llama")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def ct_like_volume(seed: int = 0) -> np.ndarray:
    """The synthetic CT-like volume as the model takes it, [1, 32, 256, 256]."""
    return phantom.ct_like_volume(seed)[None]


@pytest.fixture(scope="session")
def volume() -> np.ndarray:
    return ct_like_volume()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from m3d_edge.export.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {f: write_tiny_checkpoint(root / f, family=f, seed=0) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from m3d_edge.export.exporter import export_bundle

    root = tmp_path_factory.mktemp("bundle")
    return {f: export_bundle(ckpt, root / f).bundle for f, ckpt in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def references(tiny_checkpoints):
    from m3d_edge.export.reference import ReferenceModel

    return {f: ReferenceModel.from_checkpoint(ckpt) for f, ckpt in tiny_checkpoints.items()}


@pytest.fixture(scope="session")
def pipelines(tiny_bundles):
    from m3d_edge.runtime.pipeline import Pipeline

    return {f: Pipeline.open(b) for f, b in tiny_bundles.items()}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
