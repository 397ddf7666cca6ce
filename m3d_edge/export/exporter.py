"""Checkpoint folder -> verified bundle: ONNX graphs, embedding table, tokenizer.json and manifest.

Memory-bounded: the encoders are traced from a model without decoder layers; the decoder graphs are
written layer by layer from the memory-mapped shards (:mod:`m3d_edge.export.decoder_onnx`) at the
requested precision (a full FP32 decoder is never built on the way to INT4/INT8) and validated against a
torch decoder of the first ``validate_layers`` layers (all of them for small models, a truncated copy of
the first two at the released sizes, where two whole models would not fit in memory).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from m3d_edge import __version__
from m3d_edge.bundle import (
    EMBED_TABLE,
    MANIFEST,
    TENSORRT_DECODER,
    TOKENIZER,
    GraphEntry,
    GraphSpec,
    Manifest,
    decoder_spec,
    graph_specs,
    io_declaration,
    sha256_file,
    write_manifest,
)
from m3d_edge.errors import ExportError
from m3d_edge.export.checkpoint import read_generation_config, read_json
from m3d_edge.export.graphs import GRAPH_MODULES, DecoderGraph, example_inputs, model_dims
from m3d_edge.fileio import atomic_path

OPSET = 17
MAX_IR_VERSION = 10  # Jetson and other older onnxruntime builds reject newer IR
EXTERNAL_DATA_BYTES = 1 << 30  # graphs larger than this keep their weights in a side file
TOLERANCE = {"vision": 1e-4, "decoder": 1e-3, "decoder_std": 1e-3, "seg_encoder": 1e-4, "seg_decoder": 1e-3}
ENCODERS = ("vision", "seg_encoder", "seg_decoder")
FULL_VALIDATION_BYTES = 2 << 30  # decoders up to this size are validated whole; larger ones on 2 layers
TRUNCATED_LAYERS = 2
TOLERANCE.update(image_encoder=1e-4, text_encoder=1e-4)  # M3D-CLIP: gated on cosine (export/clip.py)


@dataclass
class GraphReport:
    name: str
    seconds: float
    bytes: int
    max_abs_diff: float | None = None


@dataclass
class ExportReport:
    bundle: Path
    graphs: list[GraphReport] = field(default_factory=list)
    seconds: float = 0.0


Progress = Callable[[str, str], None]  # (graph name, event) where event is "start" | "done"


def _export_graph(module: torch.nn.Module, spec: GraphSpec, args: tuple, path: Path) -> None:
    """Trace one graph, cap its IR version and save it (weights as external data when large)."""
    import onnx

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmpdir:
        tmp = Path(tmpdir) / path.name  # torch writes the weights of >2 GB graphs beside it
        # no_grad: the TorchScript tracer otherwise records autograd state and keeps every activation of
        # the example pass alive (about 9 GB for the two ViT-B encoders at batch 2)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=spec.input_names(),
                output_names=spec.output_names(),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=OPSET,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    large = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    data_name = f"{path.name}.data"
    (path.parent / data_name).unlink(missing_ok=True)
    with atomic_path(path) as out:
        onnx.save(
            proto, str(out), save_as_external_data=large, all_tensors_to_one_file=True, location=data_name
        )
    onnx.checker.check_model(str(path))


def _graph_files(bundle: Path, spec: GraphSpec) -> list[str]:
    files = [spec.file]
    if (bundle / f"{spec.file}.data").is_file():
        files.append(f"{spec.file}.data")
    return files


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


def _bundle_id(family: str, manifest_files: dict[str, str]) -> str:
    h = hashlib.sha256(json.dumps(manifest_files, sort_keys=True).encode()).hexdigest()
    return f"m3d-{family}-{h[:12]}"


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
    g = torch.Generator().manual_seed(0)
    kv, hd = dims.num_kv_heads, dims.head_dim
    max_len = 16
    past = [np.zeros((1, kv, max_len if fused else 0, hd), np.float32) for _ in range(2 * layers)]
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
            worst = max(worst, float(np.abs(a[:, :, :total] - b).max()) / max(1.0, float(np.abs(b).max())))
        past, ref_past = list(got[2:]), list(ref[2:])
    return worst


def _sha256_cached(path: Path, cache: dict[Path, str]) -> str:
    if path not in cache:
        cache[path] = sha256_file(path)
    return cache[path]


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
    from m3d_edge.export.decoder_onnx import PRECISIONS, write_decoders
    from m3d_edge.export.streamed import encoders_model
    from m3d_edge.export.tokenizer import read_token_ids, write_tokenizer_json

    ckpt, out = Path(ckpt), Path(out)
    from m3d_edge.export.clip import export_clip_bundle, is_clip_checkpoint

    if is_clip_checkpoint(ckpt):  # M3D-CLIP -> a retrieval bundle
        kw = {"allow_pickle": allow_pickle, "validate": validate, "overwrite": overwrite}
        return export_clip_bundle(ckpt, out, progress=progress, **kw)
    start = time.perf_counter()
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if tensorrt_graph is None:
        tensorrt_graph = precision == "fp32"
    if tensorrt_graph and precision != "fp32":
        raise ExportError(
            f"--tensorrt-graph needs --precision fp32 (TensorRT builds from FP32 weights), not {precision}"
        )
    if (out / MANIFEST).exists() and not overwrite:
        raise ExportError(f"{out}: already holds a bundle (pass --overwrite to replace it)")
    model, cfg = encoders_model(ckpt, allow_pickle=allow_pickle)
    if not cfg.has_seg:
        raise ExportError(
            f"{ckpt}/config.json: no segmentation_module; m3d-edge exports M3D-LaMed with SegVol"
        )
    dims = model_dims(cfg)
    specs = graph_specs(dims)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    report = ExportReport(bundle=out)
    graphs: dict[str, GraphEntry] = {}
    hashes: dict[Path, str] = {}

    def record(name: str, spec: GraphSpec, files: list[str], prec: str, t0: float, diff) -> None:
        graphs[name] = GraphEntry(
            file=files[0],
            precision=prec,
            default=prec,
            sha256={f: _sha256_cached(out / f, hashes) for f in files},
            opset=OPSET,
            ir_version=MAX_IR_VERSION,
            inputs=io_declaration(spec.inputs),
            outputs=io_declaration(spec.outputs),
        )
        size = sum((out / f).stat().st_size for f in files)
        report.graphs.append(GraphReport(name, time.perf_counter() - t0, size, diff))
        if progress:
            progress(name, "done")

    for name in ENCODERS:
        spec = specs[name]
        if progress:
            progress(name, "start")
        t0 = time.perf_counter()
        module = GRAPH_MODULES[name](model).eval()
        _export_graph(module, spec, example_inputs(name, dims), out / spec.file)
        diff = validate_graph(out, spec, module, dims) if validate else None
        if diff is not None and diff > TOLERANCE[name]:
            raise ExportError(
                f"{out / spec.file}: ONNX output differs from torch by {diff:.2e} (> {TOLERANCE[name]})"
            )
        record(name, spec, _graph_files(out, spec), "fp32", t0, diff)
        del module

    table = model.model.embed_tokens.weight.detach().numpy().astype(np.float32)
    with atomic_path(out / EMBED_TABLE) as tmp, open(tmp, "wb") as f:
        np.save(f, table)
    embed_shape = list(table.shape)
    del model, table

    if progress:
        progress("decoder", "start")
    t0 = time.perf_counter()
    files = write_decoders(ckpt, cfg, dims, out, precision=precision, standard=tensorrt_graph)
    decoder_files = [files.fused, *files.data]
    diffs: dict[str, float | None] = {"decoder": None, "decoder_std": None}
    if validate:
        diffs = _validate_decoders(ckpt, cfg, dims, out, precision, tensorrt_graph, validate_layers)
    record("decoder", specs["decoder"], decoder_files, precision, t0, diffs["decoder"])
    decoders = {"onnxruntime": "decoder"}
    if files.standard:
        std_spec = decoder_spec(dims, standard=True)
        record(TENSORRT_DECODER, std_spec, [files.standard, *files.data], "fp32", t0, diffs["decoder_std"])
        decoders["tensorrt"] = TENSORRT_DECODER

    tok_sha = write_tokenizer_json(ckpt, out / TOKENIZER)
    token_ids = read_token_ids(ckpt)
    gen_cfg = read_generation_config(ckpt)
    eos = gen_cfg.get("eos_token_id", token_ids["eos"])
    eos = sorted({*(eos if isinstance(eos, list) else [eos]), token_ids["eos"]})
    tok_cfg = read_json(ckpt / "tokenizer_config.json")
    manifest_files = {name: g.sha256 for name, g in graphs.items()}
    manifest = Manifest(
        bundle_id=_bundle_id(dims.family, manifest_files),
        producer=f"m3d-edge {__version__}",
        dims=dims,
        token_ids={**token_ids, "eos": eos},
        prompt={
            "image_token": "<im_patch>",
            "num_image_tokens": dims.num_image_tokens,
            "splice_start": 1,
            "add_bos": bool(tok_cfg.get("add_bos_token", True)),
        },
        preprocessing={
            "image_size": list(dims.image_size),
            "intensity": "minmax",
            "crop_foreground": True,
            "resize": "trilinear",
            "align_corners": False,
        },
        generation={
            "max_new_tokens": 256,
            "do_sample": False,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "repetition_penalty": 1.0,
        },
        graphs=graphs,
        embed={"file": EMBED_TABLE, "sha256": sha256_file(out / EMBED_TABLE), "shape": embed_shape},
        tokenizer={"file": TOKENIZER, "sha256": tok_sha},
        source={
            "checkpoint": ckpt.name,
            "model_type": cfg.raw["model_type"],
            "config_sha256": sha256_file(ckpt / "config.json"),
            "decoder_export": {**files.settings, "validated_layers": diffs.get("layers")},
        },
        decoders=decoders,
    )
    write_manifest(out, manifest)
    report.seconds = time.perf_counter() - start
    return report


def _validate_decoders(ckpt, cfg, dims, out: Path, precision, standard, layers) -> dict:
    """Torch parity of the decoder graph structure on the first ``layers`` layers (module docstring).

    The fp32 graphs of the bundle are checked directly when all layers are validated; otherwise (and for
    quantized exports, whose weights differ from torch by design) a truncated fp32 copy is written to a
    temporary folder by the same writer and checked.
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
    with tempfile.TemporaryDirectory(dir=out, prefix=".validate-") as tmp:
        if layers == dims.num_layers and precision == "fp32":
            folder = out
        else:
            folder = Path(tmp)
            write_decoders(ckpt, cfg, dims, folder, precision="fp32", standard=standard, layers=layers)
        diffs: dict = {"layers": layers}
        checks = [("decoder", "decoder.onnx", True)]
        if standard:
            checks.append(("decoder_std", "decoder_std.onnx", False))
        for name, file, fused in checks:
            diff = validate_decoder(folder / file, module, dims, layers, fused)
            if diff > TOLERANCE[name]:
                raise ExportError(
                    f"{out / file}: decoder differs from torch by {diff:.2e} on its first {layers} layers"
                    f" (> {TOLERANCE[name]})"
                )
            diffs[name] = diff
        diffs.setdefault("decoder_std", None)
    return diffs
