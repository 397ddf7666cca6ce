"""Checkpoint folder -> verified bundle: ONNX graphs, embedding table, tokenizer.json and manifest."""

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
    TOKENIZER,
    GraphEntry,
    GraphSpec,
    Manifest,
    graph_specs,
    io_declaration,
    sha256_file,
    write_manifest,
)
from m3d_edge.errors import ExportError
from m3d_edge.export.checkpoint import read_generation_config, read_json
from m3d_edge.export.graphs import GRAPH_MODULES, example_inputs, model_dims
from m3d_edge.export.reference import ReferenceModel
from m3d_edge.fileio import atomic_path

OPSET = 17
MAX_IR_VERSION = 10  # Jetson and other older onnxruntime builds reject newer IR
EXTERNAL_DATA_BYTES = 1 << 30  # graphs larger than this keep their weights in a side file
TOLERANCE = {"vision": 1e-4, "decoder": 1e-3, "seg_encoder": 1e-4, "seg_decoder": 1e-3}
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
        with warnings.catch_warnings():
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


def export_bundle(
    ckpt: Path | str,
    out: Path | str,
    *,
    allow_pickle: bool = False,
    validate: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportReport:
    """Export every graph of a checkpoint into ``out`` and write the manifest last.

    The manifest is written only when every graph exported, passed ``onnx.checker`` and (with
    ``validate``) matched torch within :data:`TOLERANCE`; a failed export leaves no manifest behind.
    """
    from m3d_edge.export.tokenizer import read_token_ids, write_tokenizer_json

    ckpt, out = Path(ckpt), Path(out)
    from m3d_edge.export.clip import export_clip_bundle, is_clip_checkpoint

    if is_clip_checkpoint(ckpt):  # M3D-CLIP -> a retrieval bundle
        kw = {"allow_pickle": allow_pickle, "validate": validate, "overwrite": overwrite}
        return export_clip_bundle(ckpt, out, progress=progress, **kw)
    start = time.perf_counter()
    if (out / MANIFEST).exists() and not overwrite:
        raise ExportError(f"{out}: already holds a bundle (pass --overwrite to replace it)")
    ref = ReferenceModel.from_checkpoint(ckpt, allow_pickle=allow_pickle)
    cfg = ref.cfg
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
    for name, spec in specs.items():
        if progress:
            progress(name, "start")
        t0 = time.perf_counter()
        module = GRAPH_MODULES[name](ref.model).eval()
        _export_graph(module, spec, example_inputs(name, dims), out / spec.file)
        diff = validate_graph(out, spec, module, dims) if validate else None
        if diff is not None and diff > TOLERANCE[name]:
            raise ExportError(
                f"{out / spec.file}: ONNX output differs from torch by {diff:.2e} (> {TOLERANCE[name]})"
            )
        files = _graph_files(out, spec)
        graphs[name] = GraphEntry(
            file=spec.file,
            sha256={f: sha256_file(out / f) for f in files},
            opset=OPSET,
            ir_version=MAX_IR_VERSION,
            inputs=io_declaration(spec.inputs),
            outputs=io_declaration(spec.outputs),
        )
        size = sum((out / f).stat().st_size for f in files)
        report.graphs.append(GraphReport(name, time.perf_counter() - t0, size, diff))
        if progress:
            progress(name, "done")

    table = ref.inner.embed_tokens.weight.detach().numpy().astype(np.float32)
    with atomic_path(out / EMBED_TABLE) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, table)
    tok_sha = write_tokenizer_json(ckpt, out / TOKENIZER)
    token_ids = read_token_ids(ckpt)
    gen_cfg = read_generation_config(ckpt)
    eos = gen_cfg.get("eos_token_id", token_ids["eos"])
    eos = sorted({*(eos if isinstance(eos, list) else [eos]), token_ids["eos"]})
    tok_cfg = read_json(ckpt / "tokenizer_config.json")
    files = {name: g.sha256 for name, g in graphs.items()}
    manifest = Manifest(
        bundle_id=_bundle_id(dims.family, files),
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
        embed={"file": EMBED_TABLE, "sha256": sha256_file(out / EMBED_TABLE), "shape": list(table.shape)},
        tokenizer={"file": TOKENIZER, "sha256": tok_sha},
        source={
            "checkpoint": ckpt.name,
            "model_type": cfg.raw["model_type"],
            "config_sha256": sha256_file(ckpt / "config.json"),
        },
    )
    write_manifest(out, manifest)
    report.seconds = time.perf_counter() - start
    return report
