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
bundle's declaration, :func:`~m3d_edge.runtime.trt_backend.profile_shapes`). Plans go to ``engines/<dir>/<graph>.plan`` beside an
``engine.json`` (see :mod:`m3d_edge.runtime.trt_backend`); the builder's timing cache is shared across
builds in ``engines/timing.cache``. A plan whose cache key (source sha256, GPU, TensorRT, precision,
profiles, options) is unchanged is reused, not rebuilt.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from m3d_edge.bundle import GraphEntry, Manifest, read_manifest, sha256_file
from m3d_edge.errors import BackendError, ExportError
from m3d_edge.fileio import atomic_path, atomic_write_bytes
from m3d_edge.runtime.trt_backend import (  # noqa: F401  (re-exported: the build API)
    ENGINE_JSON,
    ENGINE_SCHEMA,
    ENGINES_DIR,
    TIMING_CACHE,
    Cuda,
    TrtLogger,
    axis_ranges,
    check_engine_compatible,
    engine_cache_key,
    engine_dir_name,
    format_cc,
    import_tensorrt,
    kv_cache_bytes,
    profile_names,
    profile_shapes,
    profiles_json,
    read_engine_json,
    trt_major,
    write_engine_json,
)

GRAPHS = ("vision", "decoder", "seg_encoder", "seg_decoder")
BuildProgress = Callable[[str, str], None]  # (graph or "graph/phase", event text)


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


def _progress_monitor(trt, graph: str, progress: BuildProgress):
    """A TensorRT IProgressMonitor (10.x+) reporting top-level phases and every ~10% of their steps."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = max(int(num_steps), 1)
            if parent_phase is None:
                progress(graph, f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            n = self.steps.get(phase_name, 1)
            if n >= 10 and (step + 1) % max(n // 10, 1) == 0:
                progress(f"{graph}/{phase_name}", f"{step + 1}/{n}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Monitor()


def _autocast_fp16(src: Path, dst: Path) -> None:
    """TensorRT 11's FP16 route: ModelOpt AutoCast FP32 -> mixed FP16 ONNX, I/O types kept."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as e:
        raise ExportError(
            "FP16 engines with TensorRT 11 need an FP16 ONNX from NVIDIA ModelOpt AutoCast "
            f"(`pip install nvidia-modelopt[onnx]`), not importable here ({e})"
        ) from e
    import onnx

    model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16", keep_io_types=True)
    try:
        big = model.ByteSize() > (1 << 30)
    except Exception:  # protobuf refuses to size messages over 2 GB
        big = True
    onnx.save(model, str(dst), save_as_external_data=big, location=dst.name + ".data" if big else None)


def _build_plan(
    trt,
    src: Path,
    plan_path: Path,
    shapes: dict[str, list],
    *,
    precision: str,
    source_precision: str,
    typing: str,
    workspace_gb: float,
    cache_path: Path,
    monitor: Any,
    opt_level: int | None = None,
) -> None:
    logger = TrtLogger.get(trt)
    builder = trt.Builder(logger)
    if trt_major(trt.__version__) >= 11:
        flags = 0  # strong typing is the only mode
    elif typing == "strong":
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:
        flags = 0  # 10.x: explicit batch is implied
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{src}: TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default: keep FP32 engines FP32
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)  # 0..5, TensorRT's default 3
    if typing == "weak":
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8" and source_precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit: the graph's Q/DQ scales, no calibrator
    n_profiles = len(next(iter(shapes.values())))
    for k in range(n_profiles):
        profile = builder.create_optimization_profile()
        for name, ranges in shapes.items():
            lo, opt, hi = ranges[k]
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another device is not used
    if monitor is not None:
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{src}: TensorRT could not build a {precision} engine (see the log above)")
    with atomic_path(plan_path) as tmp, open(tmp, "wb") as f:
        f.write(plan)
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))


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
    cuda = Cuda(device)
    gpu, cc = cuda.device_info()
    version = trt.__version__
    manifest = read_manifest(bundle, verify=True)
    dims, specs = manifest.dims, manifest.tensorrt_specs()  # the decoder: the standard-op graph
    context = dims.context_length
    max_seq = int(max_seq or context)
    unknown = [g for g in graphs if g not in specs]
    if unknown:
        raise ExportError(f"{bundle}: no graph named {', '.join(unknown)}")
    precisions = [p for p, on in (("fp16", fp16), ("int8", int8)) if on] or ["fp32"]
    show = progress or _print_progress
    root = bundle / ENGINES_DIR
    root.mkdir(exist_ok=True)
    cache_path = root / TIMING_CACHE
    infos: list[EngineInfo] = []
    for precision in precisions:
        folder = root / engine_dir_name(gpu, cc, version, precision)
        folder.mkdir(exist_ok=True)
        try:
            old = read_engine_json(folder).get("graphs", {})
        except BackendError:
            old = {}
        entries: dict[str, dict[str, Any]] = {}
        for name in graphs:
            spec = specs[name]
            file, src_prec, src_sha, note = select_source(bundle, manifest.tensorrt_entry(name), precision)
            typing = network_typing(precision, version)
            shapes = profile_shapes(spec, dims, max_batch, max_seq, context)
            profiles = profiles_json(spec, dims, max_batch, max_seq, context)
            options = {
                "workspace_gb": workspace_gb,
                "typing": typing,
                "source": src_prec,
                "opt_level": opt_level,
            }
            key = engine_cache_key(src_sha, gpu, cc, version, precision, profiles, options)
            plan = folder / f"{name}.plan"
            prev = old.get(name, {})
            if (
                not force
                and prev.get("key") == key
                and plan.is_file()
                and sha256_file(plan) == prev.get("sha256")
            ):
                show(name, f"{precision}: up to date ({plan.relative_to(bundle)})")
                entries[name] = prev
                infos.append(
                    EngineInfo(
                        name, precision, plan, file, src_prec, typing, 0.0, plan.stat().st_size, True, note
                    )
                )
                continue
            show(name, f"{precision}: building from {file} ({typing} typing){' - ' + note if note else ''}")
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="m3d-trt.") as tmp:
                src = bundle / file
                if precision in ("fp16", "int8") and src_prec != "int8" and trt_major(version) >= 11:
                    src = Path(tmp) / f"{name}.fp16.onnx"
                    show(name, "converting to mixed FP16 with ModelOpt AutoCast")
                    _autocast_fp16(bundle / file, src)
                _build_plan(
                    trt,
                    src,
                    plan,
                    shapes,
                    precision=precision,
                    source_precision=src_prec,
                    typing=typing,
                    workspace_gb=workspace_gb,
                    cache_path=cache_path,
                    monitor=_progress_monitor(trt, name, show),
                    opt_level=opt_level,
                )
            info = EngineInfo(
                name,
                precision,
                plan,
                file,
                src_prec,
                typing,
                time.perf_counter() - t0,
                plan.stat().st_size,
                False,
                note,
            )
            entries[name] = engine_entry(info, src_sha, profiles, key, sha256_file(plan))
            infos.append(info)
            show(name, f"{precision}: done in {info.seconds:.1f} s, {info.bytes / 1e6:.1f} MB")
        data = engine_json(
            manifest,
            gpu,
            cc,
            version,
            precision,
            {**old, **entries},
            max_batch=max_batch,
            max_seq=max_seq,
            context=context,
            workspace_gb=workspace_gb,
        )
        write_engine_json(folder, data)
    return infos


def infos_to_dicts(infos: list[EngineInfo]) -> list[dict[str, Any]]:
    return [{**asdict(i), "plan": str(i.plan)} for i in infos]
