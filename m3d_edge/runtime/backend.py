"""The session protocol (DESIGN §5) and its ONNX Runtime implementation.

A :class:`GraphSession` runs one graph: ``run(inputs) -> outputs`` with named numpy tensors, or
``run_bound(inputs, outputs)`` which binds caller-owned, preallocated numpy buffers to both sides through
ORT IO binding, so the generation loop neither allocates nor copies per token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from m3d_edge.bundle import GraphSpec
from m3d_edge.errors import BackendError

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class BackendOptions:
    provider: str = "cpu"  # cpu | cuda | tensorrt
    threads: int = 0  # 0 = onnxruntime's default
    optimization: str = "all"
    profile_dir: Path | None = None  # write an ORT profile per session there

    def session_options(self, name: str) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = OPT_LEVELS[self.optimization]
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        if self.profile_dir:
            Path(self.profile_dir).mkdir(parents=True, exist_ok=True)
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(self.profile_dir) / name)
        return so


class GraphSession:
    """One ONNX Runtime session for one graph of the bundle, checked against its declaration."""

    def __init__(self, path: Path, spec: GraphSpec, options: BackendOptions) -> None:
        if options.provider not in PROVIDERS:
            raise BackendError(f"unknown provider {options.provider!r} (choose from {', '.join(PROVIDERS)})")
        if options.optimization not in OPT_LEVELS:
            raise BackendError(
                f"unknown optimization level {options.optimization!r} ({', '.join(OPT_LEVELS)})"
            )
        wanted = PROVIDERS[options.provider]
        if wanted not in ort.get_available_providers():
            raise BackendError(
                f"{options.provider}: onnxruntime here has no {wanted} (available: "
                f"{', '.join(ort.get_available_providers())}); install m3d-edge[gpu] on a machine with a GPU"
            )
        providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options.session_options(spec.name), providers=providers
            )
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise BackendError(f"{path}: onnxruntime cannot load the graph ({e})") from e
        running = self.session.get_providers()
        if running[0] != wanted:
            raise BackendError(f"{path}: asked for {wanted} but onnxruntime runs {running[0]}")
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != (spec.input_names(), spec.output_names()):
            raise BackendError(
                f"{path}: graph inputs/outputs do not match the bundle declaration of {spec.name!r}"
            )
        self.spec = spec
        self.provider = running[0]
        self.binding = self.session.io_binding()
        self.seconds = 0.0  # time spent inside onnxruntime

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        try:
            out = self.session.run(None, inputs)
        except Exception as e:
            raise BackendError(f"{self.spec.name}: onnxruntime failed ({e})") from e
        self.seconds += time.perf_counter() - t0
        return dict(zip(self.spec.output_names(), out, strict=True))

    def run_bound(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Run with every input and output bound to the given C-contiguous CPU buffers (zero copy)."""
        b = self.binding
        for name, arr in inputs.items():
            b.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for name, arr in outputs.items():
            b.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        t0 = time.perf_counter()
        try:
            self.session.run_with_iobinding(b)
        except Exception as e:
            raise BackendError(f"{self.spec.name}: onnxruntime failed ({e})") from e
        self.seconds += time.perf_counter() - t0

    def end_profiling(self) -> str | None:
        try:
            return self.session.end_profiling() or None
        except Exception:  # profiling was not enabled
            return None
