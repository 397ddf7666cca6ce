"""The TensorRT builder calls behind :func:`m3d_edge.export.engines.build_engines`: ONNX -> network ->
builder config (precision flags, optimization profiles, timing cache) -> serialized plan on disk.

``trt`` is the untyped ``tensorrt`` module (10.x or 11.x) and its builder objects are passed as ``Any``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from m3d_edge.errors import ExportError
from m3d_edge.fileio import atomic_path, atomic_write_bytes
from m3d_edge.runtime.trt_device import TrtLogger
from m3d_edge.runtime.trt_metadata import ShapeRange, trt_major

BuildProgress = Callable[[str, str], None]  # (graph or "graph/phase", event text)


def progress_monitor(trt: Any, graph: str, progress: BuildProgress) -> Any:
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


def autocast_fp16(src: Path, dst: Path) -> None:
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


def _parse_network(trt: Any, builder: Any, src: Path, typing: str, logger: Any) -> Any:
    """The ONNX graph as a TensorRT network (the parser is returned too: the network needs it alive)."""
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
    return network, parser


def _builder_config(
    trt: Any,
    builder: Any,
    shapes: dict[str, list[ShapeRange]],
    *,
    precision: str,
    source_precision: str,
    typing: str,
    workspace_gb: float,
    opt_level: int | None,
) -> Any:
    """Memory pool, precision flags and one optimization profile per entry of ``shapes``' lists."""
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
    return config


def build_plan(
    trt: Any,
    src: Path,
    plan_path: Path,
    shapes: dict[str, list[ShapeRange]],
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
    network, _parser = _parse_network(trt, builder, src, typing, logger)
    config = _builder_config(
        trt,
        builder,
        shapes,
        precision=precision,
        source_precision=source_precision,
        typing=typing,
        workspace_gb=workspace_gb,
        opt_level=opt_level,
    )
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
