"""TensorRT engines and GPU providers: the CPU-checkable contract, plus GPU tests behind ``-m gpu``.

On CPU: profile shapes from a real tiny bundle's declaration, engine folder names and cache keys, KV buffer
sizing, engine.json round trip, refusal of mismatched engines and of a missing tensorrt/cuda-python, ORT
provider options and the refusal of a provider that is not running. The native backend's device logic
(KV cache addressing, profiles, chunked prefill, the generation loop) runs against a fake ``tensorrt`` +
``cudart`` pair whose "device" is host memory and whose "engine" is the bundle's ONNX graph in ONNX Runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fakes.cuda import FakeCudart, device_view
from fakes.tensorrt import fake_tensorrt

from m3d_edge.bundle import kv_names, read_manifest
from m3d_edge.errors import BackendError, GenerationError
from m3d_edge.export import engines as eng
from m3d_edge.runtime import trt_backend as tb
from m3d_edge.runtime import trt_device
from m3d_edge.runtime.backend import BackendOptions, GraphSession
from m3d_edge.runtime.generate import KVCache, generate


@pytest.fixture(scope="module")
def phi3(tiny_bundles):
    bundle = tiny_bundles["phi3"]
    return bundle, read_manifest(bundle, verify=False)


# -- profile shapes -----------------------------------------------------------------------------------------
def test_decoder_profiles_from_the_declaration(phi3):
    _, m = phi3
    dims, spec = m.dims, m.tensorrt_specs()["decoder"]
    ctx = dims.context_length
    shapes = tb.profile_shapes(spec, dims, max_batch=1, max_seq=64, context=ctx)
    assert list(shapes) == spec.input_names()  # every input, in declaration order
    assert tb.profile_names("decoder") == ("prefill", "decode")
    H, kvh, hd = dims.hidden_size, dims.num_kv_heads, dims.head_dim
    (pre_min, pre_opt, pre_max), (dec_min, dec_opt, dec_max) = shapes["inputs_embeds"]
    assert pre_min == (1, 1, H) and pre_max == (1, 64, H) and 1 <= pre_opt[1] <= 64
    assert dec_min == dec_opt == dec_max == (1, 1, H)
    pk = kv_names(0)[0]
    for lo, opt, hi in shapes[pk]:  # head-major past: [batch, kv_heads, past, head_dim]
        assert lo == (1, kvh, 0, hd) and hi == (1, kvh, ctx - 1, hd)
        assert all(a <= o <= b for a, o, b in zip(lo, opt, hi, strict=True))
    assert shapes["attention_mask"][0][2] == (1, ctx) and shapes["attention_mask"][1][2] == (1, ctx)
    assert shapes["position_ids"][1] == ((1, 1), (1, 1), (1, 1))
    # opt shapes are consistent: total = past + sequence
    for k in range(2):
        assert shapes["attention_mask"][k][1][1] == shapes[pk][k][1][2] + shapes["inputs_embeds"][k][1][1]
    # the full-cache present outputs are declared on the same "total" axis the profiles bound to 1..context
    nk = kv_names(0)[2]
    assert next(t for t in spec.outputs if t.name == nk).shape == (
        "batch",
        kvh,
        "total",
        hd,
    )
    assert tb.axis_ranges("decoder", dims, 1, 64, ctx)["decode"]["total"][::2] == (1, ctx)
    # fixed axes never vary; only named axes do
    for t in spec.inputs:
        for lo, opt, hi in shapes[t.name]:
            for i, d in enumerate(t.shape):
                if isinstance(d, int):
                    assert lo[i] == opt[i] == hi[i] == d


def test_encoder_profiles_and_limits(phi3):
    _, m = phi3
    dims, specs = m.dims, m.tensorrt_specs()
    vis = tb.profile_shapes(specs["vision"], dims, max_batch=2)
    assert vis == {"image": [((1, 1, *dims.image_size), (1, 1, *dims.image_size), (2, 1, *dims.image_size))]}
    seg = tb.profile_shapes(specs["seg_decoder"], dims, max_batch=1)
    assert seg["seg_hidden"] == [((1, dims.hidden_size),) * 3]
    assert len(seg["image_embedding"]) == 1
    with pytest.raises(ValueError, match="max_seq"):
        tb.profile_shapes(specs["decoder"], dims, max_seq=dims.context_length + 1)
    with pytest.raises(ValueError, match="max_batch"):
        tb.profile_shapes(specs["vision"], dims, max_batch=0)
    js = tb.profiles_json(specs["decoder"], dims, 1, 32, None)
    assert set(js) == {"prefill", "decode"} and js["decode"]["inputs_embeds"][2] == [1, 1, dims.hidden_size]
    json.dumps(js)  # serializable as is


# -- names, keys, sizes -------------------------------------------------------------------------------------
def test_engine_dir_names():
    assert (
        tb.engine_dir_name("NVIDIA H200", (9, 0), "10.13.3.9", "fp16") == "nvidia-h200-sm90-trt10.13.3.9-fp16"
    )
    assert tb.engine_dir_name("Orin (nvgpu)", "8.7", "10.3.0", "int8") == "orin-nvgpu-sm87-trt10.3.0-int8"
    assert tb.format_cc("sm90") == tb.format_cc(9.0) == tb.format_cc([9, 0]) == "9.0"
    assert tb.format_cc((12, 1)) == "12.1" and tb.format_cc("sm121") == "12.1"
    with pytest.raises(ValueError, match="precision"):
        tb.engine_dir_name("NVIDIA H200", (9, 0), "10.13", "int4")


def test_engine_cache_key_tracks_every_input():
    base = dict(
        source_sha256={"a.onnx": "1", "a.onnx.data": "2"},
        gpu="NVIDIA H200",
        cc=(9, 0),
        trt_version="10.13.3",
        precision="fp16",
        profiles={"default": {"image": [[1], [1], [1]]}},
    )
    key = tb.engine_cache_key(**base)
    assert key == tb.engine_cache_key(
        **{**base, "source_sha256": {"a.onnx.data": "2", "a.onnx": "1"}, "cc": "9.0"}
    )
    changes = [
        {"source_sha256": {"a.onnx": "x", "a.onnx.data": "2"}},
        {"gpu": "NVIDIA H100 80GB HBM3"},
        {"cc": (8, 9)},
        {"trt_version": "10.13.4"},
        {"precision": "int8"},
        {"profiles": {"default": {"image": [[1], [1], [2]]}}},
        {"options": {"workspace_gb": 8}},
    ]
    keys = {tb.engine_cache_key(**{**base, **c}) for c in changes}
    assert key not in keys and len(keys) == len(changes)


def test_kv_cache_bytes_matches_the_host_cache(phi3):
    _, m = phi3
    dims = m.dims
    cache = KVCache(dims, 100)
    host = 2 * sum(b.nbytes for b in cache.buffers)  # the host cache is one buffer set; TensorRT's two
    assert tb.kv_cache_bytes(dims, 100) == host
    assert tb.kv_cache_bytes(dims, 100, np.float16) == host // 2
    assert tb.kv_cache_bytes(dims, 100, "float32", batch=2) == 2 * host
    # the real Phi-3-mini at its full 2047-token window: 32 layers x 32 heads x 96, 805 MB per buffer in
    # FP32, two (ping-pong) buffers
    phi3_mini = types.SimpleNamespace(num_layers=32, num_kv_heads=32, head_dim=96)
    assert tb.kv_cache_bytes(phi3_mini, 2047) == 2 * 2 * 32 * 2047 * 32 * 96 * 4


# -- engine.json ----------------------------------------------------------------------------------------------
def _engine_json(m, gpu="NVIDIA H200", cc=(9, 0), trt="10.13.3", precision="fp16"):
    info = eng.EngineInfo(
        "vision", precision, Path("x/vision.plan"), "vision.onnx", "fp32", "weak", 12.5, 1234
    )
    profiles = tb.profiles_json(m.specs()["vision"], m.dims, 1, None, None)
    entry = eng.engine_entry(info, m.graphs["vision"].sha256, profiles, "k", "plan-sha")
    return eng.engine_json(
        m, gpu, cc, trt, precision, {"vision": entry}, max_batch=1, max_seq=64, context=128, workspace_gb=4
    )


def test_engine_json_round_trip(phi3, tmp_path):
    _, m = phi3
    data = _engine_json(m)
    assert data["compute_capability"] == "9.0" and data["bundle_id"] == m.bundle_id
    assert data["graphs"]["vision"]["source"]["sha256"] == m.graphs["vision"].sha256
    assert data["kv_cache_bytes_at_context"] == tb.kv_cache_bytes(m.dims, 128)
    tb.write_engine_json(tmp_path, data)
    back = tb.read_engine_json(tmp_path)
    assert back.pop("path") == str(tmp_path / tb.ENGINE_JSON)
    assert back == json.loads(json.dumps(data))
    summary = eng.manifest_engines_entry(tmp_path, back)
    assert summary["graphs"] == ["vision"] and summary["precision"] == "fp16"
    (tmp_path / tb.ENGINE_JSON).write_text(json.dumps({**data, "schema": 99}))
    with pytest.raises(BackendError, match="unknown schema"):
        tb.read_engine_json(tmp_path)
    with pytest.raises(BackendError, match="build the engines first"):
        tb.read_engine_json(tmp_path / "nowhere")


def test_mismatched_engines_are_refused(phi3, tmp_path):
    _, m = phi3
    data = {**_engine_json(m), "path": "bundle/engines/x/engine.json"}
    tb.check_engine_compatible(data, "NVIDIA H200", "9.0", "10.13.3")  # same machine: fine
    with pytest.raises(BackendError) as e:
        tb.check_engine_compatible(data, "NVIDIA GeForce RTX 4090", (8, 9), "10.13.3")
    msg = str(e.value)
    assert "\n" not in msg and "built for NVIDIA H200 (sm90)" in msg and "RTX 4090 (sm89)" in msg
    assert "build-engines" in msg
    with pytest.raises(BackendError) as e:
        tb.check_engine_compatible(data, "NVIDIA H200", (9, 0), "11.0.1")
    msg = str(e.value)
    assert "\n" not in msg and "TensorRT 10.13.3" in msg and "TensorRT 11.0.1" in msg
    # a bundle whose only engines are for another TensorRT: the refusal says why
    folder = tmp_path / tb.ENGINES_DIR / tb.engine_dir_name("NVIDIA H200", (9, 0), "10.13.3", "fp16")
    folder.mkdir(parents=True)
    tb.write_engine_json(folder, _engine_json(m))
    with pytest.raises(BackendError, match=r"built with TensorRT 10.13.3 but this machine has TensorRT 11.0"):
        tb.find_engines(tmp_path, "fp16", "NVIDIA H200", (9, 0), "11.0")
    with pytest.raises(BackendError, match=r"no int8 TensorRT engines .* build-engines"):
        tb.find_engines(tmp_path, "int8", "NVIDIA H200", (9, 0), "10.13.3")
    assert tb.find_engines(tmp_path, "fp16", "NVIDIA H200", (9, 0), "10.13.3") == folder


# -- missing packages ----------------------------------------------------------------------------------------
def test_missing_tensorrt_names_the_package(phi3, monkeypatch):
    bundle, m = phi3
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    for call in (
        tb.import_tensorrt,
        lambda: eng.build_engines(bundle),
        lambda: tb.TrtGraphSession(bundle / "x.plan", m.specs()["vision"]),
        lambda: tb.device_identity(),
    ):
        with pytest.raises(BackendError) as e:
            call()
        assert "`tensorrt`" in str(e.value) and "pip install m3d-edge[gpu]" in str(e.value)


def test_missing_cuda_python_names_the_package(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendError, match=r"cuda-python.*pip install m3d-edge\[gpu\]"):
        tb.import_cudart()


def test_modules_import_without_gpu_packages():
    code = (
        "import sys; import m3d_edge.runtime.trt_backend, m3d_edge.runtime.backend, m3d_edge.export.engines; "
        "bad = [m for m in ('torch', 'transformers', 'tensorrt', 'cuda') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- sources and typing ---------------------------------------------------------------------------------------
def test_source_selection_and_typing(phi3, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    bundle, m = phi3
    entry = m.graphs["decoder"]
    file, prec, sha, note = eng.select_source(bundle, entry, "fp16")
    assert (file, prec, sha, note) == (entry.file, "fp32", entry.sha256, "")
    file, prec, _, note = eng.select_source(bundle, entry, "int8")
    assert file == entry.file and prec == "fp32" and "no int8 variant" in note
    # a weight-only MatMulNBits variant is ONNX Runtime-only: built as fp16, and said so
    node = helper.make_node("MatMulNBits", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "q.onnx"))
    assert not eng.is_trt_parsable(tmp_path / "q.onnx") and eng.is_trt_parsable(bundle / "vision.onnx")
    fake = type(entry)(
        file=entry.file, sha256=entry.sha256, variants={"int8": {"file": str(tmp_path / "q.onnx")}}
    )
    _, prec, _, note = eng.select_source(bundle, fake, "int8")
    assert prec == "fp32" and "MatMulNBits" in note
    qdq = type(entry)(file="decoder.onnx", variants={"int8": {"file": "vision.onnx", "sha256": {"v": "1"}}})
    assert eng.select_source(bundle, qdq, "int8") == ("vision.onnx", "int8", {"v": "1"}, "")
    assert eng.network_typing("fp16", "10.13.3") == "weak" and eng.network_typing("int8", "10.3.0") == "weak"
    assert eng.network_typing("fp32", "10.13.3") == "strong"
    assert eng.network_typing("fp16", "11.0.0") == eng.network_typing("int8", "11.2") == "strong"


# -- ONNX Runtime GPU providers ---------------------------------------------------------------------------------
def test_ort_provider_options(tmp_path):
    opts = BackendOptions(
        provider="tensorrt", device_id=1, fp16=True, engine_cache_dir=tmp_path, workspace_gb=2
    )
    chain = opts.providers()
    assert [p for p, _ in chain] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert chain[0][1] == {
        "device_id": 1,
        "trt_fp16_enable": True,
        "trt_int8_enable": False,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path),
        "trt_max_workspace_size": 2 << 30,
    }
    assert chain[1][1] == {"device_id": 1} and chain[2][1] == {}
    dflt = BackendOptions(provider="tensorrt", int8=True).tensorrt_options(Path("b/engines/ort-trt"))
    assert dflt["trt_engine_cache_path"] == str(Path("b/engines/ort-trt")) and dflt["trt_int8_enable"] is True
    assert "trt_max_workspace_size" not in dflt
    cuda = BackendOptions(provider="cuda", device_id=2, gpu_mem_limit_gb=1).providers()
    assert cuda == [
        ("CUDAExecutionProvider", {"device_id": 2, "gpu_mem_limit": 1 << 30}),
        ("CPUExecutionProvider", {}),
    ]
    assert BackendOptions().providers() == [("CPUExecutionProvider", {})]
    with pytest.raises(BackendError, match="unknown provider"):
        BackendOptions(provider="rocm").providers()


def test_unavailable_cuda_provider_is_refused(phi3):
    bundle, m = phi3
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    for provider, name in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        with pytest.raises(BackendError, match=name):
            GraphSession(bundle / "vision.onnx", m.specs()["vision"], BackendOptions(provider=provider))


def test_silent_cpu_fallback_is_refused(phi3, monkeypatch):
    """onnxruntime-gpu without a driver lists CUDA but runs CPU: we must notice and say so."""
    bundle, m = phi3
    seen = {}

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=None, provider_options=None):
            seen.update(providers=providers, provider_options=provider_options)

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    with pytest.raises(
        BackendError, match="asked for CUDAExecutionProvider but onnxruntime runs CPUExecutionProvider"
    ):
        GraphSession(
            bundle / "vision.onnx", m.specs()["vision"], BackendOptions(provider="cuda", device_id=3)
        )
    assert seen["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert seen["provider_options"] == [{"device_id": 3}, {}]


# -- the native backend against a fake tensorrt + cudart (device = host memory, engine = ONNX Runtime) ---------
@pytest.fixture
def fake_gpu(phi3, tmp_path, monkeypatch):
    bundle, m = phi3
    max_seq = 100  # < the prompt: prefill runs in chunks
    folder = tmp_path / tb.engine_dir_name("Fake GPU", (9, 0), "10.99.0", "fp32")
    folder.mkdir()
    for g in m.specs():
        (folder / f"{g}.plan").write_text(json.dumps({"graph": g}))
    data = _engine_json(m, gpu="Fake GPU", trt="10.99.0", precision="fp32")
    data["graphs"] = {}  # no plan hashes: fake plans
    tb.write_engine_json(folder, data)
    cudart = FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(bundle, m, max_seq, cudart))
    monkeypatch.setattr(trt_device, "import_cudart", lambda: cudart)
    return folder, tb.read_engine_json(folder), cudart


def test_trt_graph_session_matches_onnxruntime(phi3, fake_gpu, pipelines, volume):
    _, m = phi3
    folder, info, _ = fake_gpu
    spec = m.specs()["vision"]
    sess = tb.TrtGraphSession(folder / "vision.plan", spec, info)
    image = volume[None]
    got = sess.run({"image": image})["image_embeds"]
    want = pipelines["phi3"].sessions["vision"].run({"image": image})["image_embeds"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    out = {"image_embeds": np.zeros_like(want)}
    sess.run_bound({"image": image}, out)
    np.testing.assert_array_equal(out["image_embeds"], got)
    sess.close()


def _device_cache(cache: tb.TrtKVCache, layer: int, kv: int) -> np.ndarray:
    """The valid cache of one tensor as the engine sees it: the front buffer's head, [1, kv_heads, L, hd]."""
    hd = cache.row_bytes // cache.dtype.itemsize
    return device_view(cache.past(layer, kv), (1, cache.kv_heads, cache.length, hd), cache.dtype).copy()


def _assert_same_cache(dev: tb.TrtKVCache, host: KVCache, num_layers: int, atol: float = 2e-4) -> None:
    # two different graphs (standard ops vs GroupQueryAttention) on tiny std-1.0 weights: float32
    # accumulation order differs, up to ~8e-5 on keys of magnitude ~10 with AVX-512 kernels and 2.9e-4
    # (2.7e-5 relative) with AVX2-only ones (AMD EPYC Zen 3); a position bug is of order 1
    assert dev.length == host.length and dev.ids == host.ids
    for i in range(num_layers):
        for kv in (0, 1):
            want = host.buffers[2 * i + kv][:, :, : host.length]
            np.testing.assert_allclose(_device_cache(dev, i, kv), want, rtol=1e-4, atol=atol)


def test_trt_decoder_generates_the_same_tokens(phi3, fake_gpu, pipelines, volume):
    _, m = phi3
    folder, info, cudart = fake_gpu
    pipe = pipelines["phi3"]
    dims = m.dims
    dec = tb.TrtDecoder(folder / "decoder.plan", m.tensorrt_specs()["decoder"], dims, pipe.embed_table, info)
    assert dec.max_seq == 100 and dec.context_length == dims.context_length
    state = pipe.prepare(volume)
    ids = pipe.prompt_ids("What is shown?")
    assert len(ids) > dec.max_seq  # exercises chunked prefill
    embeds = pipe.embed(ids, state.image_embeds)
    kw = dict(max_new_tokens=10, eos_ids=set(), keep_hidden=True)
    host = pipe.decoder.new_cache(len(ids) + 16)
    want = generate(pipe.decoder, host, embeds, ids, **kw)
    cache = dec.new_cache(len(ids) + 16)
    assert cache.nbytes == tb.kv_cache_bytes(dims, len(ids) + 16)
    h2d_before = cudart.h2d_bytes
    got = generate(dec, cache, embeds, ids, **kw)
    assert got.tokens == want.tokens and cache.length == len(ids) + 9 and cache.ids == ids + got.tokens[:-1]
    np.testing.assert_allclose(np.array(got.hidden), np.array(want.hidden), atol=1e-4)
    np.testing.assert_allclose(dec.logits, pipe.decoder.logits, atol=1e-4)
    _assert_same_cache(cache, host, dims.num_layers)  # head-major, on the front buffer
    # per token only the embedding row goes up and logits + hidden come back (no KV round trip, no copy)
    H, V = dims.hidden_size, dims.vocab_size
    assert cudart.h2d_bytes - h2d_before == (len(ids) + 9) * H * 4
    assert cudart.d2d_bytes == 0
    # a follow-up question reuses the cached prefix on the device: one compaction of it, then prefill
    ids2 = pipe.prompt_ids("Where is it?")
    reuse = next(k for k, (a, b) in enumerate(zip(cache.ids, ids2, strict=False)) if a != b)
    assert 0 < reuse < cache.length
    embeds2 = pipe.embed(ids2, state.image_embeds)
    want2 = generate(pipe.decoder, host, embeds2, ids2, **kw)  # the host cache reuses its prefix too
    got2 = generate(dec, cache, embeds2, ids2, **kw)
    assert got2.tokens == want2.tokens
    np.testing.assert_allclose(np.array(got2.hidden), np.array(want2.hidden), atol=1e-4)
    fresh = generate(pipe.decoder, pipe.decoder.new_cache(len(ids2) + 16), embeds2, ids2, **kw)
    assert got2.tokens == fresh.tokens
    kv_heads, hd = dims.num_kv_heads, dims.head_dim
    assert cudart.d2d_bytes == 2 * dims.num_layers * kv_heads * reuse * hd * 4
    _assert_same_cache(cache, host, dims.num_layers)
    with pytest.raises(GenerationError, match="exceeds"):
        dec.new_cache(dims.context_length + 1)
    d2h = cudart.d2h_bytes
    dec.step_token(cache, 5)
    assert cudart.d2h_bytes - d2h == (H + V) * 4
    dec.close()
    cache.close()


def test_trt_kv_cache_truncate_compacts_each_head(phi3, fake_gpu):
    _, m = phi3
    dims = m.dims
    cuda = tb.Cuda()
    cudart = cuda.rt
    cache = tb.TrtKVCache(cuda, dims, 40, np.float32, cuda.stream())
    kvh, hd, L = dims.num_kv_heads, dims.head_dim, 30
    rng = np.random.default_rng(0)
    full = rng.standard_normal((dims.num_layers, 2, 1, kvh, L, hd)).astype(np.float32)
    for i in range(dims.num_layers):
        for kv in (0, 1):
            device_view(cache.past(i, kv), full[i, kv].shape, np.float32)[...] = full[i, kv]
    cache.length, cache.ids = L, list(range(L))
    front = cache.front
    cache.truncate(L + 5)  # beyond the length: keeps everything, copies nothing (as the host cache)
    assert (cache.length, cache.front, cudart.d2d_bytes) == (L, front, 0)
    cache.truncate(L)
    assert (cache.length, cache.front, cudart.d2d_bytes) == (L, front, 0)
    cache.truncate(12)
    assert cache.length == 12 and cache.ids == list(range(12)) and cache.front == 1 - front
    assert cudart.d2d_bytes == 2 * dims.num_layers * kvh * 12 * hd * 4
    for i in range(dims.num_layers):
        for kv in (0, 1):
            np.testing.assert_array_equal(_device_cache(cache, i, kv), full[i, kv][:, :, :12])
    cache.truncate(5)
    for i in range(dims.num_layers):
        for kv in (0, 1):
            np.testing.assert_array_equal(_device_cache(cache, i, kv), full[i, kv][:, :, :5])
    cache.truncate(0)
    assert cache.length == 0 and cache.ids == []
    with pytest.raises(GenerationError, match="-1"):
        cache.truncate(-1)
    cache.close()


def test_engine_for_another_gpu_is_refused_at_load(phi3, fake_gpu):
    _, m = phi3
    folder, info, _ = fake_gpu
    with pytest.raises(BackendError, match=r"built for NVIDIA H200 .* this machine has Fake GPU"):
        tb.TrtGraphSession(folder / "vision.plan", m.specs()["vision"], {**info, "gpu": "NVIDIA H200"})


# -- on a GPU with TensorRT ------------------------------------------------------------------------------------
def _need_gpu():
    pytest.importorskip("tensorrt")
    try:
        tb.device_identity()
    except BackendError as e:
        pytest.skip(str(e))


@pytest.mark.gpu
def test_gpu_build_and_parity(tiny_bundles, pipelines, volume, tmp_path):
    _need_gpu()
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["phi3"], bundle)
    infos = eng.build_engines(bundle, fp16=False, max_seq=128, progress=lambda *a: None)
    assert {i.graph for i in infos} == set(eng.GRAPHS) and all(i.plan.is_file() for i in infos)
    again = eng.build_engines(bundle, fp16=False, max_seq=128, progress=lambda *a: None)
    assert all(i.reused for i in again)  # same key: nothing rebuilt
    m = read_manifest(bundle)
    pipe = pipelines["phi3"]
    sessions, dec, _ = tb.open_engines(bundle, "fp32", m.dims, m.tensorrt_specs(), pipe.embed_table)
    state = pipe.prepare(volume)
    emb = sessions["vision"].run({"image": state.image})["image_embeds"]
    np.testing.assert_allclose(emb, state.image_embeds, atol=1e-3)
    ids = pipe.prompt_ids("What is shown?")
    embeds = pipe.embed(ids, state.image_embeds)
    kw = dict(max_new_tokens=16, eos_ids=set())
    want = generate(pipe.decoder, pipe.decoder.new_cache(len(ids) + 16), embeds, ids, **kw)
    got = generate(dec, dec.new_cache(len(ids) + 16), embeds, ids, **kw)
    assert got.tokens == want.tokens


@pytest.mark.gpu
def test_gpu_refuses_engines_of_another_tensorrt(tiny_bundles, tmp_path):
    _need_gpu()
    gpu, cc, version = tb.device_identity()
    data = {
        "schema": tb.ENGINE_SCHEMA,
        "gpu": gpu,
        "compute_capability": cc,
        "trt_version": "0.0.0",
        "graphs": {},
    }
    folder = tmp_path / tb.ENGINES_DIR / tb.engine_dir_name(gpu, cc, "0.0.0", "fp16")
    folder.mkdir(parents=True)
    tb.write_engine_json(folder, data)
    with pytest.raises(BackendError, match=r"TensorRT 0.0.0"):
        tb.find_engines(tmp_path, "fp16", gpu, cc, version)
