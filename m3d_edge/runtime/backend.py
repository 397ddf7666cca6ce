"""The session protocol (docs/architecture.md §6) and its ONNX Runtime implementation.

A :class:`GraphSession` runs one graph: ``run(inputs) -> outputs`` with named numpy tensors, or
``run_bound(inputs, outputs)`` which binds caller-owned, preallocated numpy buffers to both sides through
ORT IO binding, so the generation loop neither allocates nor copies per token.

Providers: ``cpu`` (default), ``cuda`` and ``tensorrt`` (ONNX Runtime's TensorRT execution provider, which
builds and caches its own engines; the native TensorRT backend is :mod:`m3d_edge.runtime.trt_backend`).
The GPU options (device id, FP16/INT8 switches, engine and timing cache folder, workspace) become the
provider-options dicts of :meth:`BackendOptions.providers`; after creating a session we check
``session.get_providers()`` and refuse loudly when the requested provider is not the one running
(onnxruntime-gpu silently falls back to CPU without a driver).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from m3d_edge.bundle import GraphSpec, Manifest
from m3d_edge.choices import PROVIDERS
from m3d_edge.errors import BackendError
from m3d_edge.runtime.protocols import Array

log = logging.getLogger(__name__)

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


KEEP_ARENA_GRAPHS = frozenset({"decoder"})  # run per token; the others release their arena after each run
ORT_TRT_CACHE = "engines/ort-trt"  # default TensorRT EP engine/timing cache folder, inside the bundle


@dataclass(frozen=True)
class BackendOptions:
    provider: str = "cpu"  # cpu | cuda | tensorrt
    threads: int = 0  # 0 = onnxruntime's default
    optimization: str = "all"
    profile_dir: Path | None = None  # write an ORT profile per session there
    # GPU execution providers (ignored on cpu)
    device_id: int = 0
    fp16: bool = False  # tensorrt: let TensorRT pick FP16 kernels (trt_fp16_enable)
    int8: bool = False  # tensorrt: INT8 kernels for QDQ graphs (trt_int8_enable)
    engine_cache_dir: Path | None = (
        None  # tensorrt: engine + timing cache folder (default: bundle/engines/ort-trt)
    )
    workspace_gb: float | None = None  # tensorrt: builder workspace limit (None: onnxruntime's default)
    gpu_mem_limit_gb: float | None = None  # cuda: arena limit (None: onnxruntime's default)

    def cuda_options(self) -> dict[str, object]:
        """CUDAExecutionProvider options (names from onnxruntime's CUDA EP documentation)."""
        opts: dict[str, object] = {"device_id": self.device_id}
        if self.gpu_mem_limit_gb:
            opts["gpu_mem_limit"] = int(self.gpu_mem_limit_gb * (1 << 30))
        return opts

    def tensorrt_options(self, cache_dir: Path | None = None) -> dict[str, object]:
        """TensorrtExecutionProvider options (onnxruntime's ``trt_*`` provider options)."""
        folder = Path(self.engine_cache_dir or cache_dir or ORT_TRT_CACHE)
        opts: dict[str, object] = {
            "device_id": self.device_id,
            "trt_fp16_enable": self.fp16,
            "trt_int8_enable": self.int8,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(folder),
        }
        if self.workspace_gb:
            opts["trt_max_workspace_size"] = int(self.workspace_gb * (1 << 30))
        return opts

    def execution_provider(self) -> str:
        """onnxruntime's name of the provider asked for; an unknown name is a :class:`BackendError`."""
        if self.provider not in PROVIDERS:
            raise BackendError(f"unknown provider {self.provider!r} (choose from {', '.join(PROVIDERS)})")
        return PROVIDERS[self.provider]

    def run_options(self, name: str) -> ort.RunOptions:
        """Run options of graph ``name``. Only the decoder, run once per token, keeps its memory arena
        grown between runs; the others shrink it at the end of each run. An encoder runs once per study,
        and its arena would keep the run's peak activations (0.9 GB for the ViT-B vision encoder on one
        volume) for the life of the process. Shrinking keeps the arena's speed within the run, where
        turning the arena off costs the first run 70% more time (benchmarks/results/full_size.md)."""
        ro = ort.RunOptions()
        if name not in KEEP_ARENA_GRAPHS:
            device = "cpu:0" if self.provider == "cpu" else f"cpu:0;gpu:{self.device_id}"
            ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", device)
        return ro

    def providers(self, cache_dir: Path | None = None) -> list[tuple[str, dict[str, object]]]:
        """(provider, options) in priority order, as ``InferenceSession(providers=...)`` takes them.

        TensorRT falls back to CUDA for nodes it does not take, then CPU; CUDA falls back to CPU.
        """
        self.execution_provider()  # refuses an unknown name
        chain: list[tuple[str, dict[str, object]]] = []
        if self.provider == "tensorrt":
            chain.append((PROVIDERS["tensorrt"], self.tensorrt_options(cache_dir)))
        if self.provider in ("tensorrt", "cuda"):
            chain.append((PROVIDERS["cuda"], self.cuda_options()))
        chain.append((PROVIDERS["cpu"], {}))
        return chain

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
        wanted = options.execution_provider()
        if options.optimization not in OPT_LEVELS:
            raise BackendError(
                f"unknown optimization level {options.optimization!r} ({', '.join(OPT_LEVELS)})"
            )
        if wanted not in ort.get_available_providers():
            raise BackendError(
                f"{options.provider}: onnxruntime here has no {wanted} (available: "
                f"{', '.join(ort.get_available_providers())}); install m3d-edge[gpu] on a machine with a GPU"
            )
        available = set(ort.get_available_providers())
        chain = [(p, o) for p, o in options.providers(Path(path).parent / ORT_TRT_CACHE) if p in available]
        if options.provider == "tensorrt":
            Path(str(chain[0][1]["trt_engine_cache_path"])).mkdir(parents=True, exist_ok=True)
        try:
            self.session = ort.InferenceSession(
                str(path),
                sess_options=options.session_options(spec.name),
                providers=[p for p, _ in chain],
                provider_options=[o for _, o in chain],
            )
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise BackendError(f"{path}: onnxruntime cannot load the graph ({e})") from e
        running = self.session.get_providers()
        if running[0] != wanted:
            raise BackendError(
                f"{path}: asked for {wanted} but onnxruntime runs {running[0]} (no usable GPU/driver, or the "
                f"provider failed to initialise; see onnxruntime's log)"
            )
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != (spec.input_names(), spec.output_names()):
            raise BackendError(
                f"{path}: graph inputs/outputs do not match the bundle declaration of {spec.name!r}"
            )
        self.spec = spec
        self.provider: str = running[0]
        self.binding = self.session.io_binding()
        self.run_options = options.run_options(spec.name)
        self.seconds = 0.0  # time spent inside onnxruntime

    def run(self, inputs: dict[str, Array]) -> dict[str, Array]:
        t0 = time.perf_counter()
        try:
            out: list[Array] = self.session.run(None, inputs, self.run_options)
        except Exception as e:
            raise BackendError(f"{self.spec.name}: onnxruntime failed ({e})") from e
        self.seconds += time.perf_counter() - t0
        return dict(zip(self.spec.output_names(), out, strict=True))

    def run_bound(self, inputs: dict[str, Array], outputs: dict[str, Array]) -> None:
        """Bind the given C-contiguous CPU buffers (zero copy) and run; names bound by an earlier call and
        not given again stay bound to their buffers (the decoder binds its cache once per cache)."""
        b = self.binding
        for name, arr in inputs.items():
            b.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for name, arr in outputs.items():
            b.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        t0 = time.perf_counter()
        try:
            self.session.run_with_iobinding(b, self.run_options)
        except Exception as e:
            raise BackendError(f"{self.spec.name}: onnxruntime failed ({e})") from e
        self.seconds += time.perf_counter() - t0

    def end_profiling(self) -> str | None:
        try:
            profile: str = self.session.end_profiling()
            return profile or None
        except Exception:  # profiling was not enabled
            return None


class OnDemandSession:
    """A :class:`GraphSession` created on its first run, for graphs that some tasks never use (the SegVol
    graphs: 0.5 GB at full size, for segmentation only). ``provider`` is the one asked for, which is what
    the session runs once opened (:class:`GraphSession` refuses any other)."""

    def __init__(self, path: Path, spec: GraphSpec, options: BackendOptions) -> None:
        self._args = (path, spec, options)
        self._session: GraphSession | None = None
        self.spec = spec
        self.provider: str = options.execution_provider()

    @property
    def opened(self) -> GraphSession:
        if self._session is None:
            self._session = GraphSession(*self._args)
        return self._session

    @property
    def seconds(self) -> float:
        return self._session.seconds if self._session is not None else 0.0

    def run(self, inputs: dict[str, Array]) -> dict[str, Array]:
        return self.opened.run(inputs)

    def end_profiling(self) -> str | None:
        return self._session.end_profiling() if self._session is not None else None


@dataclass
class OpenedGraphs:
    """A bundle's graphs opened as ONNX Runtime sessions, and the precision each one runs."""

    sessions: dict[str, GraphSession | OnDemandSession]
    precisions: dict[str, str]
    fallbacks: dict[str, str]  # graph -> what runs instead of the one precision asked for all


def open_graph_sessions(
    bundle: Path,
    manifest: Manifest,
    options: BackendOptions,
    precision: str | dict[str, str] | None,
    on_demand: frozenset[str] = frozenset(),
) -> OpenedGraphs:
    """One :class:`GraphSession` per graph of the manifest, at the precision asked for or its default;
    the graphs named in ``on_demand`` open on their first run (:class:`OnDemandSession`).

    ``precision``: one name applies to every graph that has that variant (the others keep their default,
    recorded in ``fallbacks``); a dict names it per graph (and must exist there: ``resolve`` refuses).
    """
    opened = OpenedGraphs({}, {}, {})
    for name, spec in manifest.specs().items():
        entry = manifest.graphs[name]
        if isinstance(precision, dict):
            want = precision.get(name)
        else:
            want = precision if precision in (entry.precision, *entry.variants) else None
        file, opened.precisions[name] = entry.resolve(want)
        if isinstance(precision, str) and want is None:
            opened.fallbacks[name] = f"{opened.precisions[name]} (no {precision} variant)"
        kind = OnDemandSession if name in on_demand else GraphSession
        opened.sessions[name] = kind(bundle / file, spec, options)
    return opened
