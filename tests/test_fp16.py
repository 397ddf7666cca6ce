"""``export --precision fp16`` (issue 13): float16 weights, activations and KV cache in the fused decoder,
float32 embeddings in and logits/hidden state out; against the torch reference on both tiny variants.

fp16 rounds at every op, so greedy tokens can part from the reference at a near-tie (measured: one
position of 48 on the tiny Llama). The pipeline comparison is therefore teacher-forced on the reference
tokens, against the FP32 bundle's logits (which equal torch's within 1e-3, tests/test_runtime.py):
within :data:`BOUND` of their scale (the export's tolerance), and the same argmax wherever the top-2 margin exceeds
twice that. Measured on the ~270-token prompts: worst 2.75e-2, mean 2.5e-3-7.6e-3, and 71 of 72
teacher-forced positions agree (the one miss has a 0.3 % margin). A rotary or cache bug is off by order 1.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from m3d_edge.bundle import read_manifest
from m3d_edge.choices import FAMILIES
from m3d_edge.export.checkpoint import read_config
from m3d_edge.export.exporter import TOLERANCE, export_bundle, validate_decoder
from m3d_edge.export.graphs import DecoderGraph, model_dims
from m3d_edge.export.streamed import truncated_decoder
from m3d_edge.runtime.generate import SamplingParams
from m3d_edge.runtime.pipeline import Pipeline

BOUND = TOLERANCE["decoder_fp16"]  # the export's check, also the pipeline's


@pytest.fixture(scope="module")
def fp16_bundles(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    return {f: export_bundle(tiny_checkpoints[f], out / f, precision="fp16").bundle for f in FAMILIES}


def test_fp16_bundle_declares_a_half_cache_and_float32_io(fp16_bundles, family):
    bundle = fp16_bundles[family]
    m = read_manifest(bundle)
    dec = m.graphs["decoder"]
    assert (dec.precision, dec.default) == ("fp16", "fp16")
    assert "decoder_std" not in m.graphs and m.decoders == {"onnxruntime": "decoder"}
    dtypes = {t["name"]: t["dtype"] for t in dec.inputs + dec.outputs}
    cache = {v for k, v in dtypes.items() if k.startswith(("past_key_values.", "present."))}
    assert cache == {"float16"}
    assert (dtypes["inputs_embeds"], dtypes["logits"], dtypes["last_hidden_state"]) == ("float32",) * 3
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMul"} <= ops
    assert "MatMulNBits" not in ops
    weights = {i.name: i.data_type for i in model.graph.initializer}
    matmul_w = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"]
    assert matmul_w and {weights[w] for w in matmul_w} == {onnx.TensorProto.FLOAT16}
    assert m.source["decoder_export"]["precision"] == "fp16"


def test_fp16_decoder_against_torch(fp16_bundles, tiny_checkpoints, family):
    """The bundle's own fp16 graph, every layer, vs the torch decoder: prefill + step, relative error."""
    ckpt = tiny_checkpoints[family]
    cfg = read_config(ckpt)
    dims = model_dims(cfg)
    module = DecoderGraph(truncated_decoder(ckpt, cfg, dims.num_layers)).eval()
    diff = validate_decoder(fp16_bundles[family] / "decoder.onnx", module, dims, dims.num_layers, fused=True)
    assert 1e-5 < diff <= BOUND  # above the FP32 graph's ~1e-6: the half-precision graph really runs


def _teacher_forced_logits(pipe: Pipeline, volume, ids: list[int], ref: list[int]) -> list[np.ndarray]:
    state = pipe.prepare(volume)
    cache = pipe.decoder.new_cache(len(ids) + len(ref) + 1)
    pipe.decoder.step(cache, pipe.embed(ids, state.image_embeds), ids)
    out = [pipe.decoder.logits[0].copy()]
    for t in ref[:-1]:
        pipe.decoder.step_token(cache, t)
        out.append(pipe.decoder.logits[0].copy())
    return out


@pytest.mark.parametrize(
    "task,args",
    [("report", {}), ("vqa", {"target": "Which organ is enlarged?"}), ("locate", {"target": "liver"})],
)
def test_fp16_pipeline_follows_the_reference(fp16_bundles, pipelines, references, family, volume, task, args):
    p16, p32 = Pipeline.open(fp16_bundles[family]), pipelines[family]
    assert p16.decoder.new_cache(4).buffers[0].dtype == np.float16
    result = p16.ask(volume, task=task, max_new_tokens=12, **args)
    assert result.provenance["precision"]["decoder"] == "fp16" and len(result.tokens) == 12
    ids = p32.prompt_ids(result.question, result.prompt["separator"] == " ")
    ref = (
        references[family]
        .generate(
            torch.from_numpy(volume)[None],
            torch.tensor([ids]),
            max_new_tokens=12,
            eos_token_id=sorted(p32.eos_ids),
        )
        .tokens
    )
    assert result.tokens[:3] == ref[:3]  # the first tokens have wide margins on both tiny models
    agree = 0
    for got, want, token in zip(
        _teacher_forced_logits(p16, volume, ids, ref),
        _teacher_forced_logits(p32, volume, ids, ref),
        ref,
        strict=True,
    ):
        scale = max(1.0, float(np.abs(want).max()))
        assert float(np.abs(got - want).max()) <= BOUND * scale
        assert int(np.argmax(want)) == token  # the FP32 bundle is the reference (test_runtime)
        top2 = np.sort(want)[-2:]
        if top2[1] - top2[0] > 2 * BOUND * scale:
            assert int(np.argmax(got)) == token
        agree += int(np.argmax(got)) == token
    assert agree >= len(ref) - 1


def test_fp16_segmentation_mask(fp16_bundles, pipelines, volume):
    """The [SEG] hidden state leaves the fp16 graph as float32 and gives the FP32 bundle's mask."""
    p16, p32 = Pipeline.open(fp16_bundles["phi3"]), pipelines["phi3"]
    params = SamplingParams(logit_bias={p32.seg_id: 50.0})
    a = p16.ask(volume, task="segment", target="liver", max_new_tokens=6, sampling=params)
    b = p32.ask(volume, task="segment", target="liver", max_new_tokens=6, sampling=params)
    assert a.tokens == b.tokens and a.mask is not None and b.mask is not None
    dice = 2.0 * float((a.mask & b.mask).sum()) / max(1.0, float(a.mask.sum() + b.mask.sum()))
    assert dice >= 0.999
