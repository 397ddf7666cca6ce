"""Shared fixtures: tiny checkpoints and bundles of both variants, built once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FAMILIES = ("phi3", "llama")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def ct_like_volume(seed: int = 0) -> np.ndarray:
    """A deterministic CT-like [1, 32, 256, 256] volume in [0, 1]: body ellipse, organs, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, 32), np.linspace(-1, 1, 256), np.linspace(-1, 1, 256), indexing="ij"
    )
    vol = np.where((x / 0.85) ** 2 + (y / 0.65) ** 2 < 1, 0.45, 0.0)
    vol = vol + np.where(((x - 0.3) / 0.25) ** 2 + (y / 0.3) ** 2 + (z / 0.8) ** 2 < 1, 0.15, 0.0)
    vol = vol + np.where(((x + 0.35) / 0.2) ** 2 + ((y + 0.1) / 0.25) ** 2 < 1, -0.25, 0.0)
    vol = vol + 0.03 * rng.standard_normal(vol.shape)
    return np.clip(vol, 0, 1).astype(np.float32)[None]


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
