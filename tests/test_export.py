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


def _decoder_feeds(dims, embeds, past_kv, past_len):
    feeds = {
        "inputs_embeds": embeds,
        "attention_mask": np.ones((embeds.shape[0], past_len + embeds.shape[1]), np.int64),
        "position_ids": np.arange(past_len, past_len + embeds.shape[1], dtype=np.int64)[None].repeat(
            embeds.shape[0], 0
        ),
    }
    for i in range(dims.num_layers):
        pk, pv, _, _ = kv_names(i)
        feeds[pk], feeds[pv] = past_kv[2 * i], past_kv[2 * i + 1]
    return feeds


def test_decoder_prefill_matches_torch(tiny_bundles, references, family):
    ref, bundle = references[family], tiny_bundles[family]
    dims = model_dims(ref.cfg)
    embeds = torch.randn(1, 9, dims.hidden_size)
    with torch.no_grad():
        out = ref.model(inputs_embeds=embeds)
    empty = [np.zeros((1, dims.num_kv_heads, 0, dims.head_dim), np.float32)] * (2 * dims.num_layers)
    got = _session(bundle, "decoder").run(None, _decoder_feeds(dims, embeds.numpy(), empty, 0))
    assert np.abs(got[0] - out.logits[:, -1].numpy()).max() <= TOL_LOGITS
    assert got[2].shape == (1, dims.num_kv_heads, 9, dims.head_dim)  # the whole cache, head-major


def test_decoder_steps_with_cache_equal_full_recompute(tiny_bundles, references, family):
    """Prefill 6 tokens, then 4 single-token steps through the cache == one pass over all 10 tokens."""
    ref, bundle = references[family], tiny_bundles[family]
    dims = model_dims(ref.cfg)
    sess = _session(bundle, "decoder")
    embeds = np.random.default_rng(1).standard_normal((1, 10, dims.hidden_size)).astype(np.float32)
    kv = [np.zeros((1, dims.num_kv_heads, 0, dims.head_dim), np.float32)] * (2 * dims.num_layers)
    length, step_logits = 0, []
    for chunk in (slice(0, 6), slice(6, 7), slice(7, 8), slice(8, 9), slice(9, 10)):
        out = sess.run(None, _decoder_feeds(dims, embeds[:, chunk], kv, length))
        assert np.array_equal(out[2][:, :, :length], kv[0])  # the present starts with the past, unchanged
        kv = out[2:]
        length += chunk.stop - chunk.start
        step_logits.append(out[0])
    with torch.no_grad():
        full = ref.model(inputs_embeds=torch.from_numpy(embeds)).logits[0].numpy()
    for i, stop in enumerate((6, 7, 8, 9, 10)):
        assert np.abs(step_logits[i][0] - full[stop - 1]).max() <= TOL_LOGITS
        assert step_logits[i][0].argmax() == full[stop - 1].argmax()
    assert length == 10 and kv[0].shape[2] == 10


def test_bundle_manifest(tiny_bundles, tiny_checkpoints, family):
    bundle = tiny_bundles[family]
    m = read_manifest(bundle)
    ids = {"phi3": (32011, 32014, [32000, 32001, 32007]), "llama": (32000, 32003, [2])}[family]
    assert (m.token_ids["im_patch"], m.token_ids["seg"], m.token_ids["eos"]) == ids
    assert m.dims.family == family and m.schema_version == SCHEMA_VERSION
    assert m.prompt["num_image_tokens"] == 256 and m.prompt["splice_start"] == 1
    for name, entry in m.graphs.items():
        proto = onnx.load(str(bundle / entry.file), load_external_data=False)
        assert proto.ir_version <= MAX_IR_VERSION
        assert [i.name for i in proto.graph.input] == graph_specs(m.dims)[name].input_names()
    assert np.load(bundle / "embed.npy").shape == (m.dims.vocab_size, m.dims.hidden_size)


def test_fast_tokenizer_in_bundle_matches_slow(tiny_bundles, tiny_checkpoints, family):
    from tokenizers import Tokenizer

    from m3d_edge.export.tokenizer import SlowTokenizer

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
    with pytest.raises(BundleError, match="seg_decoder.onnx is missing"):
        read_manifest(b)


def test_unknown_schema_version_is_refused(tiny_bundles, tmp_path):
    b = _copy(tiny_bundles["phi3"], tmp_path)
    raw = json.loads((b / MANIFEST).read_text())
    raw["schema_version"] = 99
    (b / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="schema version 99 is not supported"):
        read_manifest(b)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_export_refuses_to_overwrite(tiny_bundles, tiny_checkpoints):
    with pytest.raises(ExportError, match="already holds a bundle"):
        export_bundle(tiny_checkpoints["phi3"], tiny_bundles["phi3"])


def test_manifest_records_each_graph_declaration(tiny_bundles, tmp_path):
    m = read_manifest(tiny_bundles["llama"])
    dec = m.graphs["decoder"]
    assert dec.inputs[0] == {"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "sequence", 64]}
    assert dec.outputs[2]["name"] == "present.0.key" and dec.outputs[2]["shape"] == ["batch", 4, "total", 16]
    b = _copy(tiny_bundles["llama"], tmp_path)
    raw = json.loads((b / MANIFEST).read_text())
    raw["graphs"]["vision"]["outputs"][0]["name"] = "features"
    (b / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="recorded for 'vision' differ"):
        read_manifest(b, verify=False)
