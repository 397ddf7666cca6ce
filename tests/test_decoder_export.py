"""Issue 13: full-size presets, the streamed decoder writer (fused + standard graphs), quantization at
export, truncated validation, schema 3 and the backend protocols."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from m3d_edge.bundle import MANIFEST, read_manifest
from m3d_edge.errors import BundleError, ExportError
from m3d_edge.export.checkpoint import read_config
from m3d_edge.export.decoder_onnx import write_decoders
from m3d_edge.export.exporter import export_bundle, validate_decoder
from m3d_edge.export.graphs import DecoderGraph, model_dims
from m3d_edge.export.streamed import truncated_decoder
from m3d_edge.export.tiny import PRESETS, tiny_config


def test_full_preset_has_the_released_dims():
    phi3, llama = tiny_config("phi3", "full"), tiny_config("llama", "full")
    assert (phi3["hidden_size"], phi3["num_hidden_layers"], phi3["num_attention_heads"]) == (3072, 32, 32)
    assert (phi3["intermediate_size"], phi3["vocab_size"], phi3["num_key_value_heads"]) == (8192, 32015, 32)
    assert (llama["hidden_size"], llama["intermediate_size"], llama["vocab_size"]) == (4096, 11008, 32004)
    assert "vit_hidden_size" not in phi3 and phi3["mm_hidden_size"] == 768  # the real ViT-B encoders
    assert PRESETS["full"]["streamed"]


@pytest.mark.parametrize("fam", ["phi3", "llama"])
def test_streamed_writer_gives_the_released_layout(tmp_path, monkeypatch, fam):
    """The shard-by-shard writer (tiny dims, small shards) loads strictly into the reference model."""
    from m3d_edge.export import full_checkpoint
    from m3d_edge.export.reference import ReferenceModel
    from m3d_edge.export.tiny import write_tiny_checkpoint

    monkeypatch.setitem(PRESETS, "tiny-streamed", {**PRESETS["tiny"], "streamed": True})
    monkeypatch.setattr(full_checkpoint, "SHARD_BYTES", 1)  # one layer per shard
    ckpt = write_tiny_checkpoint(tmp_path / fam, family=fam, preset="tiny-streamed")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 2 layer shards + the rest
    ref = ReferenceModel.from_checkpoint(ckpt)  # strict key check inside
    again = write_tiny_checkpoint(tmp_path / "again", family=fam, preset="tiny-streamed")
    ref2 = ReferenceModel.from_checkpoint(again)
    for (n, a), (_, b) in zip(ref.model.state_dict().items(), ref2.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n  # same seed, same weights


def _feeds(dims, seq=5, max_len=8):
    x = np.random.default_rng(0).standard_normal((1, seq, dims.hidden_size)).astype(np.float32)
    feeds = {"inputs_embeds": x, "attention_mask": np.ones((1, seq), np.int64)}
    for i in range(dims.num_layers):
        for n in ("key", "value"):
            feeds[f"past_key_values.{i}.{n}"] = np.zeros(
                (1, dims.num_kv_heads, max_len, dims.head_dim), np.float32
            )
    return feeds


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_at_export_equals_onnxruntime_quantizer(tiny_checkpoints, tmp_path, bits):
    """int4/int8 written straight from the weights == ORT's MatMulNBits quantizer run on the FP32 graph."""
    from m3d_edge.calibration.quantize import matmulnbits_attributes, quantize_decoder

    ckpt = tiny_checkpoints["phi3"]
    cfg = read_config(ckpt)
    dims = model_dims(cfg)
    fp32, direct = tmp_path / "fp32", tmp_path / "direct"
    fp32.mkdir(), direct.mkdir()
    write_decoders(ckpt, cfg, dims, fp32, precision="fp32", standard=False)
    quantize_decoder(fp32 / "decoder.onnx", fp32 / "q.onnx", bits=bits)
    write_decoders(ckpt, cfg, dims, direct, precision=f"int{bits}", standard=False)
    attrs = matmulnbits_attributes(direct / "decoder.onnx")
    assert len(attrs) == 4 * dims.num_layers + 1  # qkv, o, gate_up, down per layer + lm_head
    assert {(a["bits"], a["block_size"], a["accuracy_level"]) for a in attrs} == {(bits, 32, 4)}
    feeds = _feeds(dims)
    want = ort.InferenceSession(str(fp32 / "q.onnx")).run(None, feeds)
    got = ort.InferenceSession(str(direct / "decoder.onnx")).run(None, feeds)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_int4_export_has_no_fp32_decoder_and_no_tensorrt_graph(tiny_checkpoints, tmp_path):
    report = export_bundle(tiny_checkpoints["llama"], tmp_path / "b", precision="int4")
    m = read_manifest(report.bundle)
    dec = m.graphs["decoder"]
    assert (dec.precision, dec.default) == ("int4", "int4") and "decoder_std" not in m.graphs
    assert m.decoders == {"onnxruntime": "decoder"}
    assert m.source["decoder_export"]["bits"] == 4 and m.source["decoder_export"]["validated_layers"] == 2
    ops = {
        n.op_type for n in onnx.load(str(report.bundle / "decoder.onnx"), load_external_data=False).graph.node
    }
    assert "MatMulNBits" in ops and "MatMul" not in ops and "GroupQueryAttention" in ops
    assert not list(report.bundle.glob("*.fp32*")) and not list(report.bundle.glob(".validate-*"))
    with pytest.raises(BundleError, match=r"no standard-op decoder for TensorRT.*re-export"):
        m.tensorrt_entry("decoder")


def test_tensorrt_graph_needs_fp32(tiny_checkpoints, tmp_path):
    with pytest.raises(ExportError, match="--tensorrt-graph needs --precision fp32"):
        export_bundle(tiny_checkpoints["phi3"], tmp_path / "b", precision="int8", tensorrt_graph=True)
    with pytest.raises(ExportError, match="unknown precision 'int3'"):
        export_bundle(tiny_checkpoints["phi3"], tmp_path / "b", precision="int3")


def test_truncated_validation_catches_a_wrong_graph(tiny_checkpoints, tmp_path):
    """The check used at full size (first k layers vs torch) passes the right graph and fails a wrong one."""
    ckpt = tiny_checkpoints["phi3"]
    cfg = read_config(ckpt)
    dims = model_dims(cfg)
    write_decoders(ckpt, cfg, dims, tmp_path, precision="fp32", standard=True, layers=1)
    one = DecoderGraph(truncated_decoder(ckpt, cfg, 1)).eval()
    assert validate_decoder(tmp_path / "decoder.onnx", one, dims, 1, fused=True) <= 1e-3
    assert validate_decoder(tmp_path / "decoder_std.onnx", one, dims, 1, fused=False) <= 1e-3
    two = DecoderGraph(truncated_decoder(ckpt, cfg, 2)).eval()  # a graph missing a layer
    with pytest.raises(ValueError):  # the 2-layer reference has more cache tensors than the graph
        validate_decoder(tmp_path / "decoder.onnx", two, dims, 2, fused=True)
    # same layer count, a different layer's weights: far above tolerance
    bad = truncated_decoder(ckpt, cfg, 1)
    bad.model.layers[0].load_state_dict(truncated_decoder(ckpt, cfg, 2).model.layers[1].state_dict())
    assert validate_decoder(tmp_path / "decoder.onnx", DecoderGraph(bad).eval(), dims, 1, fused=True) > 1e-2


def test_hidden_output_is_after_the_final_norm(tiny_bundles, references, family):
    ref, bundle = references[family], tiny_bundles[family]
    dims = model_dims(ref.cfg)
    sess = ort.InferenceSession(str(bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(dims, seq=7, max_len=16)
    _, hidden = sess.run(None, feeds)[:2]
    with torch.no_grad():
        out = ref.model.model(
            inputs_embeds=torch.from_numpy(feeds["inputs_embeds"]), output_hidden_states=True
        )
    post = out.last_hidden_state[:, -1].numpy()
    assert np.abs(hidden - post).max() <= 1e-4
    pre = out.hidden_states[-2][:, -1]  # input of the last layer: far from the normalised output
    assert np.abs(hidden - pre.numpy()).max() > 1e-2


def test_schema_2_bundles_are_refused_with_a_re_export_hint(tiny_bundles, tmp_path):
    b = tmp_path / "old"
    shutil.copytree(tiny_bundles["phi3"], b)
    raw = json.loads((b / MANIFEST).read_text())
    raw["schema_version"] = 2
    (b / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"schema version 2 is not supported.*re-export the bundle"):
        read_manifest(b)


def test_backends_implement_the_protocols(pipelines):
    from m3d_edge.runtime import trt_backend as tb
    from m3d_edge.runtime.protocols import BoundSession, Cache, DecoderBackend, Session

    pipe = pipelines["phi3"]
    assert isinstance(pipe.decoder, DecoderBackend) and isinstance(pipe.sessions["vision"], Session)
    assert isinstance(pipe.sessions["decoder"], BoundSession)
    cache = pipe.decoder.new_cache(32)
    assert isinstance(cache, Cache)
    buffers = [b.ctypes.data for b in cache.buffers]
    ids = [1, 5, 9]
    pipe.decoder.step(cache, pipe.embed_table[ids][None].astype(np.float32), ids)
    pipe.decoder.step_token(cache, 7)
    assert [b.ctypes.data for b in cache.buffers] == buffers and cache.length == 4  # in place, no regrowth
    assert cache.buffers[0][:, :, :4].any() and not cache.buffers[0][:, :, 4:].any()
    for cls, proto in (
        (tb.TrtDecoder, DecoderBackend),
        (tb.TrtKVCache, Cache),
        (tb.TrtGraphSession, Session),
    ):
        methods = [
            m
            for m in ("run", "run_bound", "new_cache", "step", "step_token", "truncate")
            if hasattr(proto, m)
        ]
        assert all(callable(getattr(cls, m, None)) for m in methods), cls
