"""Bundle graphs -> TensorRT plans, per GPU, TensorRT version and precision (docs/architecture.md §3, §6).

    infos = build_engines("bundle/", fp16=True, int8=True)

Supports TensorRT 10.x (what JetPack ships) and 11.x. What each precision is built from:

- ``fp32``: the bundle's FP32 graph, strongly typed network (every layer in the ONNX types).
- ``fp16``: TensorRT 10: the FP32 graph in a weakly typed network with ``BuilderFlag.FP16`` (TensorRT
  picks FP16 kernels where it judges them safe; graph inputs/outputs stay FP32). TensorRT 11 removed weak
  typing and ``BuilderFlag.FP16``; its migration guide converts the ONNX with ModelOpt AutoCast
  (``modelopt.onnx.autocast.convert_to_mixed_precision(onnx_path, low_precision_type="fp16",
  keep_io_types=True)``), which keeps numerically sensitive nodes in FP32. We do that into a temporary file
  and build it strongly typed. Either way the plan's I/O stays FP32, so the runtime binds the same buffers.
- ``int8``: explicit quantization only (no implicit calibrators: removed in 11.x): the bundle's symmetric
  QDQ variant ``graphs[g].variants["int8"]`` when it is one TensorRT can parse. TensorRT 10 builds it weakly
  typed with ``INT8`` + ``FP16`` so the unquantized layers run in FP16; TensorRT 11 strongly typed (the
  unquantized layers keep the ONNX's FP32). The decoder's INT8 variant is ORT's weight-only
  ``com.microsoft.MatMulNBits``, which TensorRT does not parse: such a graph is built as FP16 instead and
  ``engine.json`` says so (``source.precision`` and ``note``).

The decoder gets two optimization profiles (``prefill``: 1..max_seq new tokens after 0..context-1 cached;
``decode``: one token) with a dynamic past length: the past keys/values are head-major
``[batch, kv_heads, past, head_dim]`` with ``past`` in 0..context-1, and the ``present`` outputs are the full
cache ``[batch, kv_heads, total, head_dim]``, ``total`` = past + new in 1..context (the profiles come from the
bundle's declaration, :func:`~m3d_edge.runtime.trt_metadata.profile_shapes`). Plans go to ``engines/<dir>/<graph>.plan`` beside an
``engine.json`` (see :mod:`m3d_edge.runtime.trt_backend`); the builder's timing cache is shared across
builds in ``engines/timing.cache``. A plan whose cache key (source sha256, GPU, TensorRT, precision,
profiles, options) is unchanged is reused, not rebuilt.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from m3d_edge.bundle import GraphEntry, Manifest, read_manifest, sha256_file
from m3d_edge.errors import BackendError, ExportError
from m3d_edge.export.trt_builder import BuildProgress, autocast_fp16, build_plan, progress_monitor
from m3d_edge.runtime.trt_device import Cuda, import_tensorrt
from m3d_edge.runtime.trt_metadata import (
    ENGINE_SCHEMA,
    ENGINES_DIR,
    TIMING_CACHE,
    ShapeRange,
    engine_cache_key,
    engine_dir_name,
    format_cc,
    kv_cache_bytes,
    profile_shapes,
    profiles_json,
    read_engine_json,
    trt_major,
    write_engine_json,
)

GRAPHS = ("vision", "decoder", "seg_encoder", "seg_decoder")


@dataclass
class EngineInfo:
    """One built (or reused) plan."""

    graph: str
    precision: str  # the engine folder's precision
    plan: Path
    source: str  # bundle-relative ONNX file it was built from
    source_precision: str  # fp32 | int8 (QDQ); fp16 engines are built from the fp32 graph
    typing: str  # "strong" | "weak"
    seconds: float
    bytes: int
    reused: bool = False
    note: str = ""


# -- choosing what to build from --------------------------------------------------------------------------
def network_typing(precision: str, trt_version: str) -> str:
    """TensorRT 11 is strongly typed only; on 10, FP32 is strongly typed, FP16/INT8 use the precision flags."""
    if trt_major(trt_version) >= 11 or precision == "fp32":
        return "strong"
    return "weak"


def is_trt_parsable(path: Path) -> bool:
    """False for graphs with ONNX Runtime contrib ops (``com.microsoft``, e.g. MatMulNBits)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return all(n.domain in ("", "ai.onnx") for n in model.graph.node)


def select_source(bundle: Path, entry: GraphEntry, precision: str) -> tuple[str, str, dict[str, str], str]:
    """(file, source precision, {file: sha256}, note) a plan of ``precision`` is built from."""
    if precision == "int8":
        variant = entry.variants.get("int8")
        if variant and is_trt_parsable(bundle / variant["file"]):
            sha = variant.get("sha256") or {variant["file"]: sha256_file(bundle / variant["file"])}
            return variant["file"], "int8", dict(sha), ""
        why = (
            "its int8 variant uses ONNX Runtime's MatMulNBits, which TensorRT cannot parse"
            if variant
            else "the bundle has no int8 variant of it"
        )
        return entry.file, entry.precision, dict(entry.sha256), f"built as fp16: {why}"
    return entry.file, entry.precision, dict(entry.sha256), ""


def engine_entry(
    info: EngineInfo, source_sha256: dict[str, str], profiles: dict[str, Any], key: str, plan_sha256: str
) -> dict[str, Any]:
    """The ``engine.json`` record of one graph."""
    return {
        "file": info.plan.name,
        "sha256": plan_sha256,
        "bytes": info.bytes,
        "key": key,
        "typing": info.typing,
        "build_seconds": round(info.seconds, 3),
        "source": {"file": info.source, "precision": info.source_precision, "sha256": source_sha256},
        "profiles": profiles,
        "note": info.note,
    }


def engine_json(
    manifest: Manifest,
    gpu: str,
    cc: Any,
    trt_version: str,
    precision: str,
    graphs: dict[str, dict[str, Any]],
    *,
    max_batch: int,
    max_seq: int,
    context: int,
    workspace_gb: float,
) -> dict[str, Any]:
    """The whole ``engine.json`` of one engine folder."""
    return {
        "schema": ENGINE_SCHEMA,
        "bundle_id": manifest.bundle_id,
        "gpu": gpu,
        "compute_capability": format_cc(cc),
        "trt_version": trt_version,
        "precision": precision,
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(sum(g.get("build_seconds", 0.0) for g in graphs.values()), 3),
        "max_batch": max_batch,
        "max_seq": max_seq,
        "context": context,
        "workspace_gb": workspace_gb,
        # both ping-pong buffers (front + back) of an FP32 cache of `context` positions
        "kv_cache_bytes_at_context": kv_cache_bytes(manifest.dims, context),
        "graphs": graphs,
    }


def manifest_engines_entry(engine_dir: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A summary of one engine folder for a manifest ``engines`` list (proposed; the schema has no such field yet)."""
    return {
        "dir": f"{ENGINES_DIR}/{engine_dir.name}",
        "gpu": data["gpu"],
        "compute_capability": data["compute_capability"],
        "trt_version": data["trt_version"],
        "precision": data["precision"],
        "graphs": sorted(data["graphs"]),
    }


# -- building ----------------------------------------------------------------------------------------------
def _print_progress(name: str, event: str) -> None:
    print(f"  [{name}] {event}", file=sys.stderr, flush=True)


@dataclass
class _Build:
    """What one ``build_engines`` call builds for: the bundle, this machine, the limits and options."""

    bundle: Path
    manifest: Manifest
    trt: Any  # the tensorrt module
    gpu: str
    cc: str
    version: str
    max_batch: int
    max_seq: int
    workspace_gb: float
    opt_level: int | None
    force: bool
    show: BuildProgress

    @property
    def context(self) -> int:
        return self.manifest.dims.context_length

    @property
    def cache_path(self) -> Path:
        return self.bundle / ENGINES_DIR / TIMING_CACHE


@dataclass
class _Source:
    """What one graph's plan of one precision is built from, and the key that says it is unchanged."""

    file: str
    precision: str
    sha256: dict[str, str]
    note: str
    typing: str
    shapes: dict[str, list[ShapeRange]]
    profiles: dict[str, Any]
    key: str


def _source(b: _Build, name: str, precision: str) -> _Source:
    spec, dims = b.manifest.tensorrt_specs()[name], b.manifest.dims
    file, src_prec, src_sha, note = select_source(b.bundle, b.manifest.tensorrt_entry(name), precision)
    typing = network_typing(precision, b.version)
    profiles = profiles_json(spec, dims, b.max_batch, b.max_seq, b.context)
    options = {"workspace_gb": b.workspace_gb, "typing": typing, "source": src_prec, "opt_level": b.opt_level}
    key = engine_cache_key(src_sha, b.gpu, b.cc, b.version, precision, profiles, options)
    shapes = profile_shapes(spec, dims, b.max_batch, b.max_seq, b.context)
    return _Source(file, src_prec, src_sha, note, typing, shapes, profiles, key)


def _is_current(b: _Build, prev: dict[str, Any], src: _Source, plan: Path) -> bool:
    """The plan on disk was built from the same key and is intact: reuse it."""
    return (
        not b.force
        and prev.get("key") == src.key
        and plan.is_file()
        and sha256_file(plan) == prev.get("sha256")
    )


def _compile(b: _Build, name: str, precision: str, src: _Source, plan: Path) -> float:
    """Build one plan (through ModelOpt AutoCast for FP16 on TensorRT 11); returns the seconds it took."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="m3d-trt.") as tmp:
        onnx_file = b.bundle / src.file
        if precision in ("fp16", "int8") and src.precision != "int8" and trt_major(b.version) >= 11:
            onnx_file = Path(tmp) / f"{name}.fp16.onnx"
            b.show(name, "converting to mixed FP16 with ModelOpt AutoCast")
            autocast_fp16(b.bundle / src.file, onnx_file)
        build_plan(
            b.trt,
            onnx_file,
            plan,
            src.shapes,
            precision=precision,
            source_precision=src.precision,
            typing=src.typing,
            workspace_gb=b.workspace_gb,
            cache_path=b.cache_path,
            monitor=progress_monitor(b.trt, name, b.show),
            opt_level=b.opt_level,
        )
    return time.perf_counter() - t0


def _build_graph(
    b: _Build, folder: Path, name: str, precision: str, prev: dict[str, Any]
) -> tuple[EngineInfo, dict[str, Any]]:
    """One graph's plan in ``folder``, reused when current: its EngineInfo and ``engine.json`` entry."""
    src = _source(b, name, precision)
    plan = folder / f"{name}.plan"
    if _is_current(b, prev, src, plan):
        b.show(name, f"{precision}: up to date ({plan.relative_to(b.bundle)})")
        size = plan.stat().st_size
        return EngineInfo(
            name, precision, plan, src.file, src.precision, src.typing, 0.0, size, True, src.note
        ), prev
    b.show(
        name,
        f"{precision}: building from {src.file} ({src.typing} typing){' - ' + src.note if src.note else ''}",
    )
    seconds = _compile(b, name, precision, src, plan)
    info = EngineInfo(
        name,
        precision,
        plan,
        src.file,
        src.precision,
        src.typing,
        seconds,
        plan.stat().st_size,
        False,
        src.note,
    )
    b.show(name, f"{precision}: done in {info.seconds:.1f} s, {info.bytes / 1e6:.1f} MB")
    return info, engine_entry(info, src.sha256, src.profiles, src.key, sha256_file(plan))


def _build_folder(b: _Build, precision: str, graphs: tuple[str, ...]) -> list[EngineInfo]:
    """Every asked graph of one precision into its engine folder, then the folder's ``engine.json``."""
    folder = b.bundle / ENGINES_DIR / engine_dir_name(b.gpu, b.cc, b.version, precision)
    folder.mkdir(exist_ok=True)
    try:
        old = read_engine_json(folder).get("graphs", {})
    except BackendError:
        old = {}
    infos, entries = [], {}
    for name in graphs:
        info, entries[name] = _build_graph(b, folder, name, precision, old.get(name, {}))
        infos.append(info)
    data = engine_json(
        b.manifest,
        b.gpu,
        b.cc,
        b.version,
        precision,
        {**old, **entries},
        max_batch=b.max_batch,
        max_seq=b.max_seq,
        context=b.context,
        workspace_gb=b.workspace_gb,
    )
    write_engine_json(folder, data)
    return infos


def build_engines(
    bundle: Path | str,
    *,
    fp16: bool = True,
    int8: bool = False,
    workspace_gb: float = 4,
    max_batch: int = 1,
    max_seq: int | None = None,
    progress: BuildProgress | None = None,
    graphs: tuple[str, ...] = GRAPHS,
    device: int = 0,
    force: bool = False,
    opt_level: int | None = None,
) -> list[EngineInfo]:
    """Build (or reuse) a TensorRT plan per graph and precision; returns one :class:`EngineInfo` each.

    Precisions: ``fp16`` and/or ``int8`` as asked, ``fp32`` when neither is. ``opt_level`` sets the
    builder optimization level (0-5; lower builds faster). Raises ExportError for a
    graph TensorRT refuses, BackendError when tensorrt/cuda-python or the GPU are missing.
    """
    bundle = Path(bundle)
    trt = import_tensorrt()
    gpu, cc = Cuda(device).device_info()
    manifest = read_manifest(bundle, verify=True)
    specs = manifest.tensorrt_specs()  # the decoder: the standard-op graph
    unknown = [g for g in graphs if g not in specs]
    if unknown:
        raise ExportError(f"{bundle}: no graph named {', '.join(unknown)}")
    context = manifest.dims.context_length
    b = _Build(
        bundle=bundle,
        manifest=manifest,
        trt=trt,
        gpu=gpu,
        cc=cc,
        version=trt.__version__,
        max_batch=max_batch,
        max_seq=int(max_seq or context),
        workspace_gb=workspace_gb,
        opt_level=opt_level,
        force=force,
        show=progress or _print_progress,
    )
    (bundle / ENGINES_DIR).mkdir(exist_ok=True)
    precisions = [p for p, on in (("fp16", fp16), ("int8", int8)) if on] or ["fp32"]
    return [info for precision in precisions for info in _build_folder(b, precision, graphs)]
