"""Every exported graph against its torch module; the bundle contract and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from m3d_edge.bundle import MANIFEST, SCHEMA_VERSION, graph_specs, kv_names, read_manifest
from m3d_edge.errors import BundleError, ExportError
from m3d_edge.export.exporter import MAX_IR_VERSION, export_bundle
from m3d_edge.export.graphs import GRAPH_MODULES, example_inputs, model_dims

# FP32 tolerances (max |ORT - torch|). Encoders reach 1e-6..3e-6 and SegVol logits 5e-8. Decoder logits
# reach 2e-5..4e-4: they are about 10 in magnitude and the tiny decoders are drawn with std 1.0 (so greedy
# output varies), which saturates attention and amplifies float32 accumulation-order noise; relative to
# the logit scale that is <= 4e-5. A cache or position bug shows up as errors of order 1, far above 1e-3.
TOL = 1e-4
TOL_LOGITS = 1e-3


def _session(bundle, name):
    return ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("graph", ["vision", "seg_encoder", "seg_decoder"])
def test_encoder_graphs_match_torch(tiny_bundles, references, family, graph):
    ref, bundle = references[family], tiny_bundles[family]
    dims = model_dims(ref.cfg)
    module = GRAPH_MODULES[graph](ref.model).eval()
    spec = graph_specs(dims)[graph]
    for batch in (1, 2):  # dynamic batch
        args = example_inputs(graph, dims, batch=batch)
        args = tuple(torch.rand_like(a) if a.is_floating_point() else a for a in args)  # fresh inputs
        with torch.no_grad():
            want = module(*args).numpy()
        got = _session(bundle, graph).run(
            None, {n: a.numpy() for n, a in zip(spec.input_names(), args, strict=True)}
        )[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOL


def test_vision_graph_on_ct_like_volume(tiny_bundles, references, family, volume):
    ref, bundle = references[family], tiny_bundles[family]
    image = torch.from_numpy(volume)[None]
    want = ref.encode_images(image).numpy()
    got = _session(bundle, "vision").run(None, {"image": image.numpy()})[0]
    assert got.shape == (1, 256, ref.cfg.hidden_size)
    assert np.abs(got - want).max() <= TOL


MAX_LEN = 24


def _fused_step(sess, dims, embeds, cache, total):
    """One step of the fused decoder with every past/present pair bound to the same cache buffer."""
    b = sess.io_binding()
    logits = np.zeros((1, dims.vocab_size), np.float32)
    hidden = np.zeros((1, dims.hidden_size), np.float32)
    b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
    b.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
    for i in range(dims.num_layers):
        for j, (past, present) in enumerate(zip(kv_names(i)[:2], kv_names(i)[2:], strict=True)):
            buf = cache[2 * i + j]
            b.bind_input(past, "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
            b.bind_output(present, "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
    for name, arr in (("logits", logits), ("last_hidden_state", hidden)):
        b.bind_output(name, "cpu", 0, np.float32, arr.shape, arr.ctypes.data)
    sess.run_with_iobinding(b)
    return logits, hidden


def _new_cache(dims):
    return [
        np.zeros((1, dims.num_kv_heads, MAX_LEN, dims.head_dim), np.float32)
        for _ in range(2 * dims.num_layers)
    ]


def test_decoder_prefill_matches_torch(tiny_bundles, references, family):
    """Logits and the post-final-norm hidden state of the last position, and the cache written in place."""
    ref, bundle = references[family], tiny_bundles[family]
    dims = model_dims(ref.cfg)
    embeds = torch.randn(1, 9, dims.hidden_size)
    with torch.no_grad():
        out = ref.model(inputs_embeds=embeds, output_hidden_states=True, use_cache=True)
    cache = _new_cache(dims)
    logits, hidden = _fused_step(_session(bundle, "decoder"), dims, embeds.numpy(), cache, 9)
    assert np.abs(logits - out.logits[:, -1].numpy()).max() <= TOL_LOGITS
    # transformers' last hidden_states entry is after the final norm: the [SEG] state M3D uses
    assert np.abs(hidden - out.hidden_states[-1][:, -1].numpy()).max() <= TOL
    key0 = out.past_key_values.layers[0].keys.numpy()
    assert np.abs(cache[0][:, :, :9] - key0).max() <= TOL and not cache[0][:, :, 9:].any()


def test_decoder_steps_with_cache_equal_full_recompute(tiny_bundles, references, family):
    """Prefill 6 tokens, then a 1-token step, a 2-token chunk (prefix reuse) and single steps == one pass."""
    ref, bundle = references[family], tiny_bundles[family]
    dims = model_dims(ref.cfg)
    sess = _session(bundle, "decoder")
    embeds = np.random.default_rng(1).standard_normal((1, 10, dims.hidden_size)).astype(np.float32)
    cache, step_logits, length = _new_cache(dims), [], 0
    for chunk in (slice(0, 6), slice(6, 7), slice(7, 9), slice(9, 10)):
        before = cache[0][:, :, :length].copy()
        logits, _ = _fused_step(sess, dims, embeds[:, chunk], cache, chunk.stop)
        assert np.array_equal(cache[0][:, :, :length], before)  # the past is left as it was
        length = chunk.stop
        step_logits.append(logits)
    with torch.no_grad():
        full = ref.model(inputs_embeds=torch.from_numpy(embeds)).logits[0].numpy()
    for i, stop in enumerate((6, 7, 9, 10)):
        assert np.abs(step_logits[i][0] - full[stop - 1]).max() <= TOL_LOGITS
        assert step_logits[i][0].argmax() == full[stop - 1].argmax()


def test_standard_decoder_for_tensorrt_matches_torch(tiny_bundles, references, family):
    """decoder_std: standard ONNX ops only, schema-2 cache (past in, whole cache out), same weights file."""
    ref, bundle = references[family], tiny_bundles[family]
    m = read_manifest(bundle)
    assert m.decoders == {"onnxruntime": "decoder", "tensorrt": "decoder_std"}
    proto = onnx.load(str(bundle / "decoder_std.onnx"), load_external_data=False)
    assert {n.domain for n in proto.graph.node} == {""}
    assert m.graphs["decoder_std"].sha256.keys() == {"decoder_std.onnx", "decoder.onnx.data"}
    dims = model_dims(ref.cfg)
    embeds = np.random.default_rng(2).standard_normal((1, 8, dims.hidden_size)).astype(np.float32)
    sess = _session(bundle, "decoder_std")
    empty = np.zeros((1, dims.num_kv_heads, 0, dims.head_dim), np.float32)
    feeds = {"inputs_embeds": embeds[:, :5], "attention_mask": np.ones((1, 5), np.int64),
             "position_ids": np.arange(5)[None]}  # fmt: skip
    feeds.update({n: empty for i in range(dims.num_layers) for n in kv_names(i)[:2]})
    out = sess.run(None, feeds)
    feeds = {"inputs_embeds": embeds[:, 5:], "attention_mask": np.ones((1, 8), np.int64),
             "position_ids": np.arange(5, 8)[None]}  # fmt: skip
    feeds.update(
        {n: out[2 + k] for k, n in enumerate(x for i in range(dims.num_layers) for x in kv_names(i)[:2])}
    )
    out = sess.run(None, feeds)
    with torch.no_grad():
        full = ref.model(inputs_embeds=torch.from_numpy(embeds)).logits[0].numpy()
    assert np.abs(out[0][0] - full[-1]).max() <= TOL_LOGITS
    assert out[2].shape == (1, dims.num_kv_heads, 8, dims.head_dim)


def test_bundle_manifest(tiny_bundles, tiny_checkpoints, family):
    bundle = tiny_bundles[family]
    m = read_manifest(bundle)
    ids = {"phi3": (32011, 32014, [32000, 32001, 32007]), "llama": (32000, 32003, [2])}[family]
    assert (m.token_ids["im_patch"], m.token_ids["seg"], m.token_ids["eos"]) == ids
    assert m.dims.family == family and m.schema_version == SCHEMA_VERSION
    assert m.prompt["num_image_tokens"] == 256 and m.prompt["splice_start"] == 1
    specs = {**graph_specs(m.dims), "decoder_std": m.tensorrt_specs()["decoder"]}
    for name, entry in m.graphs.items():
        proto = onnx.load(str(bundle / entry.file), load_external_data=False)
        assert proto.ir_version <= MAX_IR_VERSION
        assert [i.name for i in proto.graph.input] == specs[name].input_names()
    assert np.load(bundle / "embed.npy").shape == (m.dims.vocab_size, m.dims.hidden_size)


def test_fast_tokenizer_in_bundle_matches_slow(tiny_bundles, tiny_checkpoints, family):
    from reference_tokenizer import SlowTokenizer
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(tiny_bundles[family] / "tokenizer.json"))
    slow = SlowTokenizer(tiny_checkpoints[family])
    for text in (
        "<im_patch>" * 256 + " Where is liver in this image? Please output the box.",
        "<im_patch>" * 256 + "Can you provide a caption consists of findings for this medical image?",
        "<bx_start>[0.125, 0.25, 0.5, 0.75, 0.812, 0.9]<bx_end> [SEG] Läsion 肺 ≥ 5 mm",
    ):
        assert fast.encode(text).ids == slow.encode(text)


def _copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def test_corrupted_graph_is_refused(tiny_bundles, tmp_path):
    b = _copy(tiny_bundles["phi3"], tmp_path)
    data = bytearray((b / "vision.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "vision.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vision.onnx is corrupted \(sha256 mismatch\)"):
        read_manifest(b)


def test_missing_file_is_refused(tiny_bundles, tmp_path):
    b = _copy(tiny_bundles["phi3"], tmp_path)
    (b / "seg_decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"seg_decoder.onnx is missing"):
        read_manifest(b)


def test_unknown_schema_version_is_refused(tiny_bundles, tmp_path):
    b = _copy(tiny_bundles["phi3"], tmp_path)
    raw = json.loads((b / MANIFEST).read_text())
    raw["schema_version"] = 99
    (b / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="schema version 99 is not supported"):
        read_manifest(b)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"no manifest.json"):
        read_manifest(tmp_path)


def test_export_refuses_to_overwrite(tiny_bundles, tiny_checkpoints):
    with pytest.raises(ExportError, match="already holds a bundle"):
        export_bundle(tiny_checkpoints["phi3"], tiny_bundles["phi3"])


def test_manifest_records_each_graph_declaration(tiny_bundles, tmp_path):
    m = read_manifest(tiny_bundles["llama"])
    dec = m.graphs["decoder"]
    assert dec.inputs[0] == {"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "sequence", 64]}
    assert dec.outputs[2]["name"] == "present.0.key" and dec.outputs[2]["shape"] == [
        "batch",
        4,
        "max_length",
        16,
    ]
    std = m.graphs["decoder_std"]
    assert std.outputs[2]["shape"] == ["batch", 4, "total", 16] and std.inputs[2]["name"] == "position_ids"
    b = _copy(tiny_bundles["llama"], tmp_path)
    raw = json.loads((b / MANIFEST).read_text())
    raw["graphs"]["vision"]["outputs"][0]["name"] = "features"
    (b / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="recorded for 'vision' differ"):
        read_manifest(b, verify=False)
