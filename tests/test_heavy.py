"""Bench-size checks (real ViT-B encoders, a 1024x8 Phi-3-shaped decoder): run with ``pytest -m heavy``.

They take minutes on 2 cores and about 10 GB of memory, so CI skips them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from m3d_edge.export.exporter import export_bundle
    from m3d_edge.export.reference import ReferenceModel
    from m3d_edge.export.tiny import write_tiny_checkpoint
    from m3d_edge.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("bench")
    ckpt = write_tiny_checkpoint(root / "ckpt", "phi3", preset="bench")
    report = export_bundle(ckpt, root / "bundle")
    return report, ReferenceModel.from_checkpoint(ckpt), Pipeline.open(report.bundle)


def test_bench_size_graphs_within_tolerance(bench):
    report, _, _ = bench
    diffs = {g.name: g.max_abs_diff for g in report.graphs}
    assert diffs["vision"] <= 1e-4 and diffs["seg_encoder"] <= 1e-4 and diffs["seg_decoder"] <= 1e-4
    assert diffs["decoder"] <= 1e-3


def test_bench_size_greedy_tokens_identical(bench, volume):
    _, ref, pipe = bench
    result = pipe.ask(volume, task="locate", target="liver", max_new_tokens=16)
    ids = pipe.prompt_ids(result.question)
    out = ref.generate(
        torch.from_numpy(volume)[None],
        torch.tensor([ids]),
        max_new_tokens=16,
        eos_token_id=sorted(pipe.eos_ids),
    )
    assert result.tokens == out.tokens
    emb = pipe.sessions["vision"].run({"image": volume[None]})["image_embeds"]
    assert np.abs(emb - ref.encode_images(torch.from_numpy(volume)[None]).numpy()).max() <= 1e-4
