"""Checkpoint folder -> verified bundle: ONNX graphs, embedding table, tokenizer.json and manifest.

Memory-bounded: the encoders are traced from a model without decoder layers; the decoder graphs are
written layer by layer from the memory-mapped shards (:mod:`m3d_edge.export.decoder_onnx`) at the
requested precision (a full FP32 decoder is never built on the way to INT4/INT8) and validated against a
torch decoder of the first ``validate_layers`` layers (all of them for small models, a truncated copy of
the first two at the released sizes, where two whole models would not fit in memory).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from m3d_edge import __version__
from m3d_edge.bundle import (
    EMBED_TABLE,
    TENSORRT_DECODER,
    TOKENIZER,
    GraphSpec,
    Manifest,
    ModelDims,
    decoder_spec,
    graph_specs,
    kv_dtype,
    sha256_file,
)
from m3d_edge.errors import ExportError
from m3d_edge.export.bundle_writer import (
    MAX_IR_VERSION,
    BundleWriter,
    ExportReport,
    GraphReport,
    Progress,
    bundle_id,
    export_graph,
    graph_files,
    preprocessing,
    refuse_existing,
)
from m3d_edge.export.checkpoint import read_generation_config
from m3d_edge.export.graphs import GRAPH_MODULES, DecoderGraph, example_inputs, model_dims
from m3d_edge.export.side_files import read_json
from m3d_edge.fileio import atomic_path

if TYPE_CHECKING:  # decoder_onnx is imported when a decoder is written
    from m3d_edge.export.decoder_onnx import DecoderFiles

# re-exported: callers and tests read these from the exporter
__all__ = [
    "MAX_IR_VERSION",
    "TOLERANCE",
    "ExportReport",
    "GraphReport",
    "export_bundle",
    "validate_decoder",
]

TOLERANCE = {"vision": 1e-4, "decoder": 1e-3, "decoder_std": 1e-3, "seg_encoder": 1e-4, "seg_decoder": 1e-3}
# fp16 activations and cache: 11-bit mantissas (relative step 4.9e-4) rounded at every op of every layer.
# Measured: 5.6e-3 on the tiny models, 2.1e-2 on the bench model (8 layers of std-0.2 weights, logits
# ~100), 2.75e-2 through the tiny pipelines' 270-token prompts; a cache or rotary bug is off by order 1
TOLERANCE["decoder_fp16"] = 5e-2
ENCODERS = ("vision", "seg_encoder", "seg_decoder")
FULL_VALIDATION_BYTES = 2 << 30  # decoders up to this size are validated whole; larger ones on 2 layers
TRUNCATED_LAYERS = 2
TOLERANCE.update(image_encoder=1e-4, text_encoder=1e-4)  # M3D-CLIP: gated on cosine (export/clip.py)


def validate_graph(bundle: Path, spec: GraphSpec, module: torch.nn.Module, dims) -> float:
    """Max |ORT - torch| over all outputs on fresh random inputs of shapes other than the traced ones."""
    import onnxruntime as ort

    args = example_inputs(spec.name, dims, batch=1, past=7, seq=2)
    session = ort.InferenceSession(str(bundle / spec.file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = session.run(None, {n: a.numpy() for n, a in zip(spec.input_names(), args, strict=True)})
    return max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref, strict=True))


def _decoder_feeds(spec_inputs: list[str], embeds: np.ndarray, past: list[np.ndarray], total: int) -> dict:
    n = embeds.shape[1]
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), np.int64)}
    if "position_ids" in spec_inputs:
        feeds["position_ids"] = np.arange(total - n, total, dtype=np.int64)[None]
    names = [x for x in spec_inputs if x.startswith("past_key_values.")]
    feeds.update(dict(zip(names, past, strict=True)))
    return feeds


def validate_decoder(path: Path, module: torch.nn.Module, dims, layers: int, fused: bool) -> float:
    """Max |ORT - torch| of logits, hidden state and cache over a 6-token prefill and a 2-token step,
    each relative to its output's scale (``max(1, max |torch|)``): the bench decoders (std 0.2 weights)
    reach logits of ~100, where float32 accumulation order alone differs by ~1e-3 between the fused
    attention kernel and transformers' eager attention; a cache or rotary bug is off by order 1."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    past_type = next(i.type for i in session.get_inputs() if i.name.startswith("past_key_values."))
    cache = np.float16 if past_type == "tensor(float16)" else np.float32
    g = torch.Generator().manual_seed(0)
    kv, hd = dims.num_kv_heads, dims.head_dim
    max_len = 16
    past = [np.zeros((1, kv, max_len if fused else 0, hd), cache) for _ in range(2 * layers)]
    ref_past = [torch.zeros(1, kv, 0, hd) for _ in range(2 * layers)]
    worst, total = 0.0, 0
    for n in (6, 2):
        x = torch.randn(1, n, dims.hidden_size, generator=g)
        total += n
        with torch.no_grad():
            ref = module(
                x, torch.ones(1, total, dtype=torch.long), torch.arange(total - n, total)[None], *ref_past
            )
        got = session.run(None, _decoder_feeds(names, x.numpy(), past, total))
        for a, b in zip(got[:2], ref[:2], strict=True):
            b = b.numpy()
            worst = max(worst, float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max())))
        for a, b in zip(got[2:], ref[2:], strict=True):
            b = b.numpy()
            got_kv = a[:, :, :total].astype(np.float32)
            worst = max(worst, float(np.abs(got_kv - b).max()) / max(1.0, float(np.abs(b).max())))
        past, ref_past = list(got[2:]), list(ref[2:])
    return worst


def _check_options(precision: str, tensorrt_graph: bool | None) -> bool:
    """Refuse an unknown precision; whether to write the standard-op decoder for TensorRT."""
    from m3d_edge.choices import EXPORT_PRECISIONS

    if precision not in EXPORT_PRECISIONS:
        raise ExportError(f"unknown precision {precision!r} (choose from {', '.join(EXPORT_PRECISIONS)})")
    if tensorrt_graph is None:
        tensorrt_graph = precision == "fp32"
    if tensorrt_graph and precision != "fp32":
        raise ExportError(
            f"--tensorrt-graph needs --precision fp32 (TensorRT builds from FP32 weights), not {precision}"
        )
    return tensorrt_graph


def _export_encoders(w: BundleWriter, model: torch.nn.Module, dims: ModelDims, validate: bool) -> None:
    """Trace the vision and SegVol graphs, each checked against torch within :data:`TOLERANCE`."""
    specs = graph_specs(dims)
    for name in ENCODERS:
        spec = specs[name]
        t0 = w.begin(name)
        module = GRAPH_MODULES[name](model).eval()
        export_graph(module, spec, example_inputs(name, dims), w.out / spec.file)
        diff = validate_graph(w.out, spec, module, dims) if validate else None
        if diff is not None and diff > TOLERANCE[name]:
            raise ExportError(
                f"{w.out / spec.file}: ONNX output differs from torch by {diff:.2e} (> {TOLERANCE[name]})"
            )
        w.record(name, spec, graph_files(w.out, spec), t0, diff)
        del module


def _write_embed_table(out: Path, model: torch.nn.Module) -> list[int]:
    """``embed.npy`` (the token embedding table, float32); returns its shape."""
    table = model.model.embed_tokens.weight.detach().numpy().astype(np.float32)
    with atomic_path(out / EMBED_TABLE) as tmp, open(tmp, "wb") as f:
        np.save(f, table)
    return list(table.shape)


@dataclass
class _Decoders:
    """What writing the decoders leaves for the manifest."""

    files: DecoderFiles  # the graphs' files and the writer's settings
    diffs: dict[str, Any]  # validation: {"decoder", "decoder_std": max diff or None, "layers"}
    decoders: dict[str, str]  # the manifest's backend -> graph map


def _export_decoders(
    w: BundleWriter,
    ckpt: Path,
    cfg: Any,
    dims: ModelDims,
    precision: str,
    tensorrt_graph: bool,
    validate: bool,
    validate_layers: int | None,
) -> _Decoders:
    """The fused decoder (and the standard-op one for TensorRT), validated on the first layers."""
    from m3d_edge.export.decoder_onnx import write_decoders

    t0 = w.begin("decoder")
    files = write_decoders(ckpt, cfg, dims, w.out, precision=precision, standard=tensorrt_graph)
    diffs: dict[str, Any] = {"decoder": None, "decoder_std": None}
    if validate:
        diffs = _validate_decoders(ckpt, cfg, dims, w.out, precision, tensorrt_graph, validate_layers)
    spec = decoder_spec(dims, cache=kv_dtype(precision))
    w.record("decoder", spec, [files.fused, *files.data], t0, diffs["decoder"], precision)
    decoders = {"onnxruntime": "decoder"}
    if files.standard:
        std_spec = decoder_spec(dims, standard=True)
        w.record(TENSORRT_DECODER, std_spec, [files.standard, *files.data], t0, diffs["decoder_std"])
        decoders["tensorrt"] = TENSORRT_DECODER
    return _Decoders(files, diffs, decoders)


def _token_ids(ckpt: Path) -> dict[str, Any]:
    """The tokenizer's special ids, ``eos`` the sorted union of generation_config's and the tokenizer's."""
    from m3d_edge.export.side_files import read_token_ids

    token_ids = read_token_ids(ckpt)
    eos = read_generation_config(ckpt).get("eos_token_id", token_ids["eos"])
    eos = sorted({*(eos if isinstance(eos, list) else [eos]), token_ids["eos"]})
    return {**token_ids, "eos": eos}


def _lamed_manifest(
    w: BundleWriter,
    ckpt: Path,
    cfg: Any,
    dims: ModelDims,
    embed_shape: list[int],
    tok_sha: str,
    dec: _Decoders,
) -> Manifest:
    tok_cfg = read_json(ckpt / "tokenizer_config.json")
    return Manifest(
        bundle_id=bundle_id(dims.family, w.graph_hashes()),
        producer=f"m3d-edge {__version__}",
        dims=dims,
        token_ids=_token_ids(ckpt),
        prompt={
            "image_token": "<im_patch>",
            "num_image_tokens": dims.num_image_tokens,
            "splice_start": 1,
            "add_bos": bool(tok_cfg.get("add_bos_token", True)),
        },
        preprocessing=preprocessing(dims.image_size),
        generation={
            "max_new_tokens": 256,
            "do_sample": False,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "repetition_penalty": 1.0,
        },
        graphs=w.graphs,
        embed={"file": EMBED_TABLE, "sha256": sha256_file(w.out / EMBED_TABLE), "shape": embed_shape},
        tokenizer={"file": TOKENIZER, "sha256": tok_sha},
        source={
            "checkpoint": ckpt.name,
            "model_type": cfg.raw["model_type"],
            "config_sha256": sha256_file(ckpt / "config.json"),
            "decoder_export": {**dec.files.settings, "validated_layers": dec.diffs.get("layers")},
        },
        decoders=dec.decoders,
    )


def export_bundle(
    ckpt: Path | str,
    out: Path | str,
    *,
    allow_pickle: bool = False,
    validate: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
    precision: str = "fp32",
    tensorrt_graph: bool | None = None,
    validate_layers: int | None = None,
) -> ExportReport:
    """Export every graph of a checkpoint into ``out`` and write the manifest last.

    ``precision`` (fp32 | int8 | int4) is the decoder's; ``tensorrt_graph`` also writes the standard-op
    decoder for TensorRT (default: with fp32, where it shares the fused graph's weight file).
    The manifest is written only when every graph exported, passed validation (with ``validate``: torch
    parity within :data:`TOLERANCE`, the decoder on ``validate_layers`` layers) and was hashed; a failed
    export leaves no manifest behind.
    """
    from m3d_edge.export.clip import export_clip_bundle, is_clip_checkpoint
    from m3d_edge.export.streamed import encoders_model
    from m3d_edge.export.tokenizer import write_tokenizer_json

    ckpt, out = Path(ckpt), Path(out)
    if is_clip_checkpoint(ckpt):  # M3D-CLIP -> a retrieval bundle
        kw = {"allow_pickle": allow_pickle, "validate": validate, "overwrite": overwrite}
        return export_clip_bundle(ckpt, out, progress=progress, **kw)
    start = time.perf_counter()
    tensorrt_graph = _check_options(precision, tensorrt_graph)
    refuse_existing(out, overwrite)
    model, cfg = encoders_model(ckpt, allow_pickle=allow_pickle)
    if not cfg.has_seg:
        raise ExportError(
            f"{ckpt}/config.json: no segmentation_module; m3d-edge exports M3D-LaMed with SegVol"
        )
    dims = model_dims(cfg)
    w = BundleWriter(out, progress)
    _export_encoders(w, model, dims, validate)
    embed_shape = _write_embed_table(out, model)
    del model
    dec = _export_decoders(w, ckpt, cfg, dims, precision, tensorrt_graph, validate, validate_layers)
    tok_sha = write_tokenizer_json(ckpt, out / TOKENIZER)
    return w.finish(_lamed_manifest(w, ckpt, cfg, dims, embed_shape, tok_sha, dec), start)


def _validate_decoders(
    ckpt: Path, cfg: Any, dims: ModelDims, out: Path, precision: str, standard: bool, layers: int | None
) -> dict[str, Any]:
    """Torch parity of the decoder graph structure on the first ``layers`` layers (module docstring).

    The fp32 and fp16 graphs of the bundle are checked directly when all layers are validated; otherwise
    a truncated copy at the same precision is written to a temporary folder by the same writer and
    checked. Quantized exports (weights differ from torch by design) are checked on an fp32 copy: their
    MatMulNBits weights are the onnxruntime quantizer's (tests/test_decoder_export.py).
    """
    from m3d_edge.export.decoder_onnx import write_decoders
    from m3d_edge.export.streamed import truncated_decoder

    h, hd, inter = dims.hidden_size, dims.head_dim, int(cfg.raw["intermediate_size"])
    per_layer = 4 * (h * (2 * dims.num_heads + 2 * dims.num_kv_heads) * hd + 3 * h * inter)
    if layers is None:
        small = per_layer * dims.num_layers <= FULL_VALIDATION_BYTES
        layers = dims.num_layers if small else min(TRUNCATED_LAYERS, dims.num_layers)
    layers = max(1, min(int(layers), dims.num_layers))
    module = DecoderGraph(truncated_decoder(ckpt, cfg, layers)).eval()
    checked = precision if precision == "fp16" else "fp32"
    with tempfile.TemporaryDirectory(dir=out, prefix=".validate-") as tmp:
        if layers == dims.num_layers and precision == checked:
            folder = out
        else:
            folder = Path(tmp)
            write_decoders(ckpt, cfg, dims, folder, precision=checked, standard=standard, layers=layers)
        diffs: dict = {"layers": layers}
        fused_bound = TOLERANCE["decoder_fp16" if checked == "fp16" else "decoder"]
        checks = [("decoder", "decoder.onnx", True, fused_bound)]
        if standard:
            checks.append(("decoder_std", "decoder_std.onnx", False, TOLERANCE["decoder_std"]))
        for name, file, fused, bound in checks:
            diff = validate_decoder(folder / file, module, dims, layers, fused)
            if diff > bound:
                raise ExportError(
                    f"{out / file}: decoder differs from torch by {diff:.2e} on its first {layers} layers"
                    f" (> {bound})"
                )
            diffs[name] = diff
        diffs.setdefault("decoder_std", None)
    return diffs
