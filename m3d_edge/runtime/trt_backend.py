"""Native TensorRT backend (docs/architecture.md §6): plans built by :mod:`m3d_edge.export.engines`, run with
``tensorrt`` + ``cuda-python`` and no torch.

Layout of the engine cache inside a bundle::

    engines/timing.cache                                  shared builder timing cache
    engines/<gpu-slug>-sm<cc>-trt<version>-<precision>/   one folder per GPU x TensorRT x precision
        engine.json                                       what was built, for what, from which graph
        vision.plan  decoder.plan  seg_encoder.plan  seg_decoder.plan

A plan only runs on the GPU model and the exact TensorRT version it was built with (TensorRT's default;
version- and hardware-compatible plans are slower and not used here), so ``engine.json`` records both and
:func:`check_engine_compatible` refuses a mismatch before TensorRT is asked to deserialize anything.

The pure helpers at the top (profile shapes, names, cache keys, buffer sizes, ``engine.json``) need neither
TensorRT nor CUDA and are unit-tested on CPU; ``tensorrt`` and ``cuda`` are imported lazily inside the
classes so this module imports everywhere.

Decoder on the device: TensorRT builds from the bundle's standard-op decoder (``decoder_std``, schema-2
contract); :class:`TrtKVCache` implements :class:`m3d_edge.runtime.protocols.Cache` with a ping-pong
layout in device memory: per layer and per K/V two flat buffers (front, back) of
``kv_heads * max_len * head_dim`` elements. A step binds the past as the head of the front buffer viewed as
``[1, kv_heads, past, head_dim]`` (the bundle's head-major layout, contiguous for batch 1) and the present,
the whole cache after the step, to the head of the back buffer viewed as ``[1, kv_heads, past + n,
head_dim]``; then the two swap. The engine's Concat writes the new cache straight into the back buffer, so
no step copies or transposes anything itself and nothing of the cache crosses to the host; only
:meth:`TrtKVCache.truncate` (prefix reuse across questions) compacts each head's first positions into the
back buffer with one device-to-device 2D copy per buffer. Per step only the new token's embedding row goes up
and the ``[1, V]`` logits and ``[1, H]`` hidden state come back; the attention mask (all ones) and the
position ids (``arange``) live on the device once and each step binds a view of them. One CUDA stream, two
execution contexts (one per optimization profile: ``prefill`` for prompts, ``decode`` for single tokens),
each enqueued with ``execute_async_v3``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.bundle import GraphSpec, ModelDims, kv_names
from m3d_edge.errors import BackendError, GenerationError

ENGINES_DIR = "engines"
ENGINE_JSON = "engine.json"
TIMING_CACHE = "timing.cache"
ENGINE_SCHEMA = 1
PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = "pip install m3d-edge[gpu]"
# the decoder gets two optimization profiles; every other graph one
DECODER_PROFILES = ("prefill", "decode")
DEFAULT_PROFILES = ("default",)

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)


# -- pure helpers (no tensorrt, no cuda) ----------------------------------------------------------------
def profile_names(graph: str) -> tuple[str, ...]:
    return DECODER_PROFILES if graph == "decoder" else DEFAULT_PROFILES


def axis_ranges(
    graph: str, dims: ModelDims, max_batch: int = 1, max_seq: int | None = None, context: int | None = None
) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of every named dynamic axis of ``graph``, per optimization profile.

    Decoder: ``prefill`` takes 1..max_seq new tokens after 0..context-1 cached ones (a follow-up question
    prefills its new suffix after the cached prefix), ``decode`` one token after up to context-1; ``past``
    is the third axis of the head-major past keys/values ``[batch, kv_heads, past, head_dim]``; ``total``
    (the attention mask, and the full-cache ``present`` outputs, whose shapes TensorRT infers) is
    past + new, 1..context. Encoders: only ``batch`` is dynamic.
    """
    context = int(context or dims.context_length)
    max_seq = int(max_seq or context)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
    if not 1 <= max_seq <= context:
        raise ValueError(f"max_seq must be in 1..{context} (the context length), got {max_seq}")
    batch = (1, 1, max_batch)
    if graph != "decoder":
        return {"default": {"batch": batch}}
    opt_seq = min(max_seq, dims.num_image_tokens + 32)  # a typical prompt: BOS + image tokens + question
    opt_past = min(context - 1, opt_seq + 64)  # the middle of a typical answer
    return {
        "prefill": {
            "batch": batch,
            "sequence": (1, opt_seq, max_seq),
            "past": (0, 0, context - 1),
            "total": (1, opt_seq, context),
        },
        "decode": {
            "batch": batch,
            "sequence": (1, 1, 1),
            "past": (0, opt_past, context - 1),
            "total": (1, opt_past + 1, context),
        },
    }


def profile_shapes(
    spec: GraphSpec,
    dims: ModelDims,
    max_batch: int = 1,
    max_seq: int | None = None,
    context: int | None = None,
) -> dict[str, list[ShapeRange]]:
    """Input name -> one (min, opt, max) shape per optimization profile, derived from the graph declaration.

    Profiles are in :func:`profile_names` order; a fixed axis is the same in all three shapes.
    """
    ranges = axis_ranges(spec.name, dims, max_batch, max_seq, context)
    out: dict[str, list[ShapeRange]] = {}
    for t in spec.inputs:
        per_profile = []
        for axes in ranges.values():
            unknown = [d for d in t.shape if isinstance(d, str) and d not in axes]
            if unknown:
                raise ValueError(f"{spec.name}.{t.name}: no range for dynamic axis {unknown[0]!r}")
            shape = [(d, d, d) if isinstance(d, int) else axes[d] for d in t.shape]
            per_profile.append(tuple(tuple(s[k] for s in shape) for k in range(3)))
        out[t.name] = per_profile
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def format_cc(cc: Any) -> str:
    """Compute capability as "major.minor" from (9, 0), "9.0", 9.0 or "sm90"."""
    if isinstance(cc, tuple | list):
        return f"{int(cc[0])}.{int(cc[1])}"
    s = str(cc).lower().removeprefix("sm_").removeprefix("sm")
    if "." in s:
        major, minor = s.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    if s.isdigit() and len(s) >= 2:
        return f"{int(s[:-1])}.{int(s[-1])}"
    raise ValueError(f"not a compute capability: {cc!r}")


def engine_dir_name(gpu: str, cc: Any, trt_version: str, precision: str) -> str:
    """``<gpu-slug>-sm<cc>-trt<version>-<precision>``, e.g. ``nvidia-h200-sm90-trt10.13.3-fp16``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown engine precision {precision!r} ({', '.join(PRECISIONS)})")
    return f"{slug(gpu)}-sm{format_cc(cc).replace('.', '')}-trt{trt_version}-{precision}"


def engine_cache_key(
    source_sha256: dict[str, str],
    gpu: str,
    cc: Any,
    trt_version: str,
    precision: str,
    profiles: dict[str, Any],
    options: dict[str, Any] | None = None,
) -> str:
    """A short hash of everything a plan depends on; a plan whose key matches need not be rebuilt."""
    blob = json.dumps(
        {
            "source": dict(sorted(source_sha256.items())),
            "gpu": gpu,
            "cc": format_cc(cc),
            "trt": trt_version,
            "precision": precision,
            "profiles": profiles,
            "options": options or {},
        },
        sort_keys=True,
        default=list,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def kv_cache_bytes(dims: ModelDims, max_len: int, dtype: Any = "float32", batch: int = 1) -> int:
    """Bytes of :class:`TrtKVCache`: two ping-pong buffers (front, back) of keys + values of every layer,
    each ``[batch, kv_heads, max_len, head_dim]`` (the standard-op decoder returns the whole cache; the
    host :class:`~m3d_edge.runtime.generate.KVCache` of the fused graph needs half: one shared buffer)."""
    item = np.dtype(dtype).itemsize
    return 2 * 2 * dims.num_layers * max_len * batch * dims.num_kv_heads * dims.head_dim * item


def profiles_json(spec: GraphSpec, dims: ModelDims, max_batch: int, max_seq: int | None, context: int | None):
    """The profiles of one graph as ``engine.json`` stores them: ``{profile: {input: [min, opt, max]}}``."""
    shapes = profile_shapes(spec, dims, max_batch, max_seq, context)
    return {
        p: {name: [list(s) for s in ranges[i]] for name, ranges in shapes.items()}
        for i, p in enumerate(profile_names(spec.name))
    }


def check_engine_compatible(engine_json: dict[str, Any], gpu: str, cc: Any, trt_version: str) -> None:
    """Refuse (BackendError, one line) a plan built for another GPU or another TensorRT version."""
    where = engine_json.get("path", "engine")
    built_gpu, built_trt = engine_json.get("gpu"), engine_json.get("trt_version")
    try:
        built_cc = format_cc(engine_json.get("compute_capability"))
    except ValueError:
        built_cc = str(engine_json.get("compute_capability"))
    here_cc = format_cc(cc)
    fix = "rebuild them here with `m3d-edge build-engines BUNDLE`"
    if built_gpu != gpu or built_cc != here_cc:
        raise BackendError(
            f"{where}: TensorRT engines were built for {built_gpu} (sm{built_cc.replace('.', '')}) but this "
            f"machine has {gpu} (sm{here_cc.replace('.', '')}); {fix}"
        )
    if built_trt != trt_version:
        raise BackendError(
            f"{where}: TensorRT engines were built with TensorRT {built_trt} but this machine has TensorRT "
            f"{trt_version}; {fix}"
        )


def read_engine_json(engine_dir: Path | str) -> dict[str, Any]:
    path = Path(engine_dir) / ENGINE_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BackendError(f"{path}: no engine description (build the engines first)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise BackendError(f"{path}: unreadable engine description ({e})") from e
    if not isinstance(data, dict) or data.get("schema") != ENGINE_SCHEMA:
        raise BackendError(f"{path}: engine description of an unknown schema (expects {ENGINE_SCHEMA})")
    data["path"] = str(path)
    return data


def write_engine_json(engine_dir: Path | str, data: dict[str, Any]) -> Path:
    from m3d_edge.fileio import atomic_write_text

    path = Path(engine_dir) / ENGINE_JSON
    clean = {k: v for k, v in data.items() if k != "path"}
    atomic_write_text(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return path


def find_engines(bundle: Path | str, precision: str, gpu: str, cc: Any, trt_version: str) -> Path:
    """The engine folder of ``bundle`` for this GPU, TensorRT version and precision, checked compatible."""
    root = Path(bundle) / ENGINES_DIR
    want = root / engine_dir_name(gpu, cc, trt_version, precision)
    if want.is_dir():
        check_engine_compatible(read_engine_json(want), gpu, cc, trt_version)
        return want
    others = sorted(p.name for p in root.glob(f"*-{precision}") if (p / ENGINE_JSON).is_file())
    if others:  # say why the ones that exist do not fit
        check_engine_compatible(read_engine_json(root / others[0]), gpu, cc, trt_version)
    raise BackendError(
        f"{bundle}: no {precision} TensorRT engines for {gpu} with TensorRT {trt_version} "
        f"(looked for {want}); build them with `m3d-edge build-engines {bundle}`"
    )


# -- lazy imports ----------------------------------------------------------------------------------------
def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(
            f"the TensorRT backend needs the `tensorrt` Python package, which is not importable here ({e}); "
            f"install it with `{INSTALL_HINT}` on a machine with an NVIDIA GPU"
        ) from e
    return trt


def import_cudart():
    """``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older ``cuda.cudart`` module."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as e:
            raise BackendError(
                f"the TensorRT backend needs the `cuda-python` package (cuda.bindings.runtime), which is not "
                f"importable here ({e}); install it with `{INSTALL_HINT}`"
            ) from e
    return cudart


def trt_major(version: str) -> int:
    return int(str(version).split(".", 1)[0])


class Cuda:
    """The few CUDA runtime calls the backend makes, with errors turned into BackendError."""

    def __init__(self, device: int = 0) -> None:
        self.rt = import_cudart()
        self.device = device
        self.call(self.rt.cudaSetDevice(device), "cudaSetDevice")

    def call(self, result: Any, what: str) -> Any:
        # cuda-python returns (error, *values)
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorString(err)
            msg = name[1] if isinstance(name, tuple) else name
            msg = msg.decode() if isinstance(msg, bytes) else msg
            raise BackendError(f"CUDA {what} failed: {msg}")
        return rest[0] if len(rest) == 1 else rest

    def device_info(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor") of the current device."""
        prop = self.call(self.rt.cudaGetDeviceProperties(self.device), "cudaGetDeviceProperties")
        name = prop.name
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        return name.split("\x00", 1)[0].strip(), f"{prop.major}.{prop.minor}"

    def malloc(self, nbytes: int) -> int:
        return int(self.call(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        if ptr:
            self.rt.cudaFree(ptr)

    def stream(self) -> Any:
        return self.call(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def upload(self, dst: int, arr: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call(self.rt.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes, kind, stream), "cudaMemcpyAsync")

    def download(self, arr: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call(self.rt.cudaMemcpyAsync(arr.ctypes.data, src, arr.nbytes, kind, stream), "cudaMemcpyAsync")

    def copy_2d(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, rows: int, stream: Any
    ) -> None:
        """Device-to-device: ``rows`` rows of ``width`` bytes, ``spitch`` apart at src, ``dpitch`` apart at dst."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.call(
            self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, kind, stream),
            "cudaMemcpy2DAsync",
        )

    def sync(self, stream: Any) -> None:
        self.call(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class TrtLogger:
    """One TensorRT logger per process (TensorRT keeps a reference to the first one it sees)."""

    _logger = None

    @classmethod
    def get(cls, trt):
        if cls._logger is None:
            cls._logger = trt.Logger(trt.Logger.WARNING)
        return cls._logger


def device_identity(device: int = 0) -> tuple[str, str, str]:
    """(GPU name, compute capability, TensorRT version) of this machine; BackendError when either is missing."""
    trt = import_tensorrt()
    return (*Cuda(device).device_info(), trt.__version__)


# -- engines ---------------------------------------------------------------------------------------------
class _Engine:
    """A deserialized plan, checked against its graph declaration and engine.json."""

    def __init__(self, plan: Path, spec: GraphSpec, cuda: Cuda, info: dict[str, Any] | None) -> None:
        self.trt = trt = import_tensorrt()
        self.cuda, self.spec, self.plan = cuda, spec, Path(plan)
        if info is not None:
            gpu, cc = cuda.device_info()
            check_engine_compatible(info, gpu, cc, trt.__version__)
            want = info.get("graphs", {}).get(spec.name, {}).get("sha256")
            if want:
                from m3d_edge.bundle import sha256_file

                if sha256_file(self.plan) != want:
                    raise BackendError(f"{plan}: plan file is corrupted (sha256 mismatch with engine.json)")
        runtime = trt.Runtime(TrtLogger.get(trt))
        try:
            engine = runtime.deserialize_cuda_engine(self.plan.read_bytes())
        except OSError as e:
            raise BackendError(f"{plan}: cannot read the TensorRT plan ({e})") from e
        if engine is None:
            raise BackendError(
                f"{plan}: TensorRT {trt.__version__} cannot deserialize this plan (built for another GPU or "
                "TensorRT version?); rebuild it with `m3d-edge build-engines BUNDLE`"
            )
        self.runtime, self.engine = runtime, engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outs = set(names) - ins
        if ins != set(spec.input_names()) or outs != set(spec.output_names()):
            raise BackendError(
                f"{plan}: engine inputs/outputs do not match the bundle declaration of {spec.name!r}"
            )
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}

    def context(self, profile: int, stream: Any):
        ctx = self.engine.create_execution_context()
        if ctx is None:
            raise BackendError(
                f"{self.plan}: TensorRT could not create an execution context (out of memory?)"
            )
        if profile:
            ctx.set_optimization_profile_async(profile, stream)
        return ctx

    def max_shape(self, name: str, profile: int = 0) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])


class TrtGraphSession:
    """One TensorRT plan behind the session protocol: ``run(inputs) -> outputs`` with host numpy arrays.

    Device buffers are sized once for the profile's largest shapes; each run uploads the inputs, enqueues
    the plan on the session's stream and downloads the outputs.
    """

    provider = "TensorRT"

    def __init__(
        self, plan: Path, spec: GraphSpec, info: dict[str, Any] | None = None, device: int = 0
    ) -> None:
        import_tensorrt()  # the first missing package is the one to name
        self.cuda = Cuda(device)
        self.stream = self.cuda.stream()
        self.e = _Engine(plan, spec, self.cuda, info)
        self.spec = spec
        self.ctx = self.e.context(0, self.stream)
        self.seconds = 0.0
        self.buffers: dict[str, int] = {}
        for name in spec.input_names():  # size the outputs for the largest inputs
            if not self.ctx.set_input_shape(name, self.e.max_shape(name)):
                raise BackendError(f"{plan}: cannot set input shape of {name}")
        try:
            for name in spec.input_names() + spec.output_names():
                shape = tuple(self.ctx.get_tensor_shape(name))
                self.buffers[name] = self.cuda.malloc(int(np.prod(shape)) * self.e.dtypes[name].itemsize)
                self.ctx.set_tensor_address(name, self.buffers[name])
        except Exception:
            self.close()
            raise

    def _enqueue(self, inputs: dict[str, np.ndarray]) -> None:
        for name in self.spec.input_names():
            arr = np.ascontiguousarray(inputs[name], dtype=self.e.dtypes[name])
            if not self.ctx.set_input_shape(name, arr.shape):
                raise BackendError(
                    f"{self.spec.name}: input {name} of shape {arr.shape} is outside the engine's profile"
                )
            self.cuda.upload(self.buffers[name], arr, self.stream)
        if not self.ctx.execute_async_v3(self.stream):
            raise BackendError(f"{self.spec.name}: TensorRT execution failed")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        self._enqueue(inputs)
        out = {}
        for name in self.spec.output_names():
            out[name] = np.empty(tuple(self.ctx.get_tensor_shape(name)), self.e.dtypes[name])
            self.cuda.download(out[name], self.buffers[name], self.stream)
        self.cuda.sync(self.stream)
        self.seconds += time.perf_counter() - t0
        return {k: v.astype(np.float32, copy=False) if v.dtype == np.float16 else v for k, v in out.items()}

    def run_bound(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Protocol parity with :class:`GraphSession`: writes into the caller's C-contiguous host arrays."""
        for name, value in self.run(inputs).items():
            if name in outputs:
                np.copyto(outputs[name], value)

    def close(self) -> None:
        for ptr in self.buffers.values():
            self.cuda.free(ptr)
        self.buffers = {}

    def __del__(self) -> None:  # best effort; the process exit frees the device anyway
        try:
            self.close()
        except Exception:
            pass


class TrtKVCache:
    """Device-resident ping-pong KV cache implementing :class:`m3d_edge.runtime.protocols.Cache`:
    ``length``, ``ids``, ``max_len`` and :meth:`truncate`.

    One allocation holds two slots (front and back); each slot holds, per layer, a keys buffer then a values
    buffer of ``kv_heads * max_len * head_dim`` elements. The valid cache is the head of the front slot's
    buffers, ``[1, kv_heads, length, head_dim]`` contiguous.
    """

    def __init__(self, cuda: Cuda, dims: ModelDims, max_len: int, dtype: np.dtype, stream: Any) -> None:
        self.cuda, self.stream, self.max_len, self.dtype = cuda, stream, int(max_len), np.dtype(dtype)
        self.num_layers, self.kv_heads = dims.num_layers, dims.num_kv_heads
        self.row_bytes = dims.head_dim * self.dtype.itemsize  # one position of one head
        self.buffer_bytes = dims.num_kv_heads * self.max_len * self.row_bytes
        self.slot_bytes = 2 * dims.num_layers * self.buffer_bytes
        self.nbytes = kv_cache_bytes(dims, self.max_len, self.dtype)
        assert self.nbytes == 2 * self.slot_bytes
        self.base = cuda.malloc(self.nbytes)
        self.front = 0  # the slot holding the valid cache
        self.length = 0
        self.ids: list[int] = []  # the token ids whose keys/values are cached (prefix reuse)

    def buffer(self, slot: int, layer: int, kv: int) -> int:
        """Device address of the keys (kv=0) or values (kv=1) buffer of ``layer`` in ``slot``."""
        return self.base + slot * self.slot_bytes + (2 * layer + kv) * self.buffer_bytes

    def past(self, layer: int, kv: int) -> int:
        return self.buffer(self.front, layer, kv)

    def present(self, layer: int, kv: int) -> int:
        return self.buffer(1 - self.front, layer, kv)

    def swap(self) -> None:
        self.front = 1 - self.front

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions: each head's first n rows move to the back buffer, which becomes the
        front (one 2D device-to-device copy per buffer, on the decoder's stream). Like the host cache, an n
        beyond ``length`` keeps everything."""
        n = int(n)
        if n < 0:
            raise GenerationError(f"cannot truncate a KV cache to {n} positions")
        n = min(n, self.length)
        if 0 < n < self.length:
            src_pitch, dst_pitch = self.length * self.row_bytes, n * self.row_bytes
            for layer in range(self.num_layers):
                for kv in (0, 1):
                    self.cuda.copy_2d(
                        self.present(layer, kv),
                        dst_pitch,
                        self.past(layer, kv),
                        src_pitch,
                        dst_pitch,
                        self.kv_heads,
                        self.stream,
                    )
            self.swap()
        self.length = n
        self.ids = self.ids[:n]

    def close(self) -> None:
        self.cuda.free(self.base)
        self.base = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TrtDecoder:
    """The decoder plan over a :class:`TrtKVCache`; what :func:`generate` uses: ``step``, ``step_token``,
    ``logits [1, V]`` and ``hidden [1, H]`` (host float32), and ``new_cache``."""

    provider = "TensorRT"

    def __init__(
        self,
        plan: Path,
        spec: GraphSpec,
        dims: ModelDims,
        embed_table: np.ndarray,
        info: dict[str, Any] | None = None,
        device: int = 0,
    ) -> None:
        import_tensorrt()  # the first missing package is the one to name
        self.cuda = Cuda(device)
        self.stream = self.cuda.stream()
        self.e = e = _Engine(plan, spec, self.cuda, info)
        self.spec, self.dims, self.embed_table = spec, dims, embed_table
        self.seconds = 0.0
        if e.engine.num_optimization_profiles < 2:
            raise BackendError(
                f"{plan}: decoder plan has no decode profile (rebuild with m3d-edge build-engines)"
            )
        self.contexts = [e.context(0, self.stream), e.context(1, self.stream)]  # prefill, decode
        self.max_seq = e.max_shape("inputs_embeds", 0)[1]
        self.context_length = e.max_shape("attention_mask", 1)[1]
        self.kv_dtype = e.dtypes[kv_names(0)[0]]
        H, V = dims.hidden_size, dims.vocab_size
        self.logits = np.zeros((1, V), np.float32)
        self.hidden = np.zeros((1, H), np.float32)
        self.token_embeds = np.zeros((1, 1, H), np.float32)
        self._logits_host = np.zeros((1, V), e.dtypes["logits"])
        self._hidden_host = np.zeros((1, H), e.dtypes["last_hidden_state"])
        c = self.cuda
        self.d_embeds = c.malloc(self.max_seq * H * e.dtypes["inputs_embeds"].itemsize)
        self.d_mask = c.malloc(self.context_length * 8)
        self.d_pos = c.malloc(self.context_length * 8)
        self.d_logits = c.malloc(V * e.dtypes["logits"].itemsize)
        self.d_hidden = c.malloc(H * e.dtypes["last_hidden_state"].itemsize)
        mask = np.ones((1, self.context_length), e.dtypes["attention_mask"])
        pos = np.arange(self.context_length, dtype=e.dtypes["position_ids"])[None]
        c.upload(self.d_mask, mask, self.stream)
        c.upload(self.d_pos, pos, self.stream)
        c.sync(self.stream)
        for ctx in self.contexts:
            ctx.set_tensor_address("inputs_embeds", self.d_embeds)
            ctx.set_tensor_address("attention_mask", self.d_mask)
            ctx.set_tensor_address("logits", self.d_logits)
            ctx.set_tensor_address("last_hidden_state", self.d_hidden)

    def new_cache(self, max_len: int) -> TrtKVCache:
        if max_len > self.context_length:
            raise GenerationError(
                f"a cache of {max_len} positions exceeds the {self.context_length} the decoder engine was built for"
            )
        return TrtKVCache(self.cuda, self.dims, max_len, self.kv_dtype, self.stream)

    def _run(self, cache: TrtKVCache, embeds: np.ndarray) -> None:
        past, n = cache.length, embeds.shape[1]
        ctx = self.contexts[1 if n == 1 else 0]
        arr = np.ascontiguousarray(embeds, dtype=self.e.dtypes["inputs_embeds"])
        self.cuda.upload(self.d_embeds, arr, self.stream)
        ctx.set_input_shape("inputs_embeds", (1, n, self.dims.hidden_size))
        ctx.set_input_shape("attention_mask", (1, past + n))
        ctx.set_input_shape("position_ids", (1, n))
        ctx.set_tensor_address("position_ids", self.d_pos + past * 8)
        kv = (1, self.dims.num_kv_heads, past, self.dims.head_dim)
        for i in range(self.dims.num_layers):
            pk, pv, nk, nv = kv_names(i)
            ctx.set_input_shape(pk, kv)
            ctx.set_input_shape(pv, kv)
            ctx.set_tensor_address(pk, cache.past(i, 0))  # [1, kv_heads, past, head_dim]: front buffer
            ctx.set_tensor_address(pv, cache.past(i, 1))
            ctx.set_tensor_address(nk, cache.present(i, 0))  # [1, kv_heads, past + n, head_dim]: back buffer
            ctx.set_tensor_address(nv, cache.present(i, 1))
        if not ctx.execute_async_v3(self.stream):
            raise BackendError("decoder: TensorRT execution failed")
        cache.swap()
        cache.length += n

    def step(self, cache: TrtKVCache, embeds: np.ndarray, ids: list[int]) -> None:
        """Feed ``embeds [1, n, H]`` after the cached prefix (in chunks of the engine's max_seq)."""
        past, n = cache.length, embeds.shape[1]
        if past + n > cache.max_len:
            raise GenerationError(f"KV cache full: {past} + {n} tokens exceed its {cache.max_len} positions")
        t0 = time.perf_counter()
        for start in range(0, n, self.max_seq):
            self._run(cache, embeds[:, start : start + self.max_seq])
        self.cuda.download(self._logits_host, self.d_logits, self.stream)
        self.cuda.download(self._hidden_host, self.d_hidden, self.stream)
        self.cuda.sync(self.stream)
        np.copyto(self.logits, self._logits_host, casting="unsafe")
        np.copyto(self.hidden, self._hidden_host, casting="unsafe")
        cache.ids.extend(ids)
        self.seconds += time.perf_counter() - t0

    def step_token(self, cache: TrtKVCache, token: int) -> None:
        np.copyto(self.token_embeds[0, 0], self.embed_table[token])
        self.step(cache, self.token_embeds, [token])

    def close(self) -> None:
        for attr in ("d_embeds", "d_mask", "d_pos", "d_logits", "d_hidden"):
            self.cuda.free(getattr(self, attr, 0))
            setattr(self, attr, 0)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def open_engines(
    bundle: Path | str,
    precision: str,
    dims: ModelDims,
    specs: dict[str, GraphSpec],
    embed_table: np.ndarray,
    device: int = 0,
    graphs: Iterable[str] = ("vision", "seg_encoder", "seg_decoder"),
) -> tuple[dict[str, TrtGraphSession], TrtDecoder, Path]:
    """Sessions for the encoder graphs and the decoder of ``bundle``'s engines for this machine."""
    gpu, cc, version = device_identity(device)
    folder = find_engines(bundle, precision, gpu, cc, version)
    info = read_engine_json(folder)
    sessions = {g: TrtGraphSession(folder / f"{g}.plan", specs[g], info, device) for g in graphs}
    decoder = TrtDecoder(folder / "decoder.plan", specs["decoder"], dims, embed_table, info, device)
    return sessions, decoder, folder
