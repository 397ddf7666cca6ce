"""The TensorRT and CUDA runtime boundary: lazy imports of ``tensorrt`` and cuda-python's ``cudart``, the
few CUDA calls the backend makes, and a deserialized plan checked against its graph declaration.

Both packages are optional and untyped: the TensorRT objects used here are typed by the Protocols below
(TensorRT 10's name-based I/O API), the modules themselves stay ``Any`` at the import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from m3d_edge.bundle import GraphSpec
from m3d_edge.errors import BackendError
from m3d_edge.runtime.trt_metadata import INSTALL_HINT, check_engine_compatible

Shape = tuple[int, ...]
Stream = object  # a cuda-python cudaStream_t: opaque here, only passed back to CUDA and TensorRT


class ExecutionContext(Protocol):
    """What the backend calls on a ``tensorrt.IExecutionContext``."""

    def set_optimization_profile_async(self, profile: int, stream: Stream) -> Any: ...
    def set_input_shape(self, name: str, shape: Shape) -> bool: ...
    def get_tensor_shape(self, name: str) -> Shape: ...
    def set_tensor_address(self, name: str, address: int) -> Any: ...
    def execute_async_v3(self, stream: Stream) -> bool: ...


class CudaEngine(Protocol):
    """What the backend calls on a ``tensorrt.ICudaEngine``."""

    num_io_tensors: int
    num_optimization_profiles: int

    def get_tensor_name(self, index: int) -> str: ...
    def get_tensor_mode(self, name: str) -> Any: ...  # a tensorrt.TensorIOMode
    def get_tensor_dtype(self, name: str) -> Any: ...  # a tensorrt.DataType
    def get_tensor_profile_shape(self, name: str, profile: int) -> list[Shape]: ...
    def create_execution_context(self) -> ExecutionContext | None: ...


class CudaRuntime(Protocol):
    """The cuda-python ``cudart`` calls the backend makes; each returns ``(cudaError_t, *values)``."""

    cudaError_t: Any  # enum namespaces of the bindings
    cudaMemcpyKind: Any

    def cudaSetDevice(self, device: int) -> Any: ...
    def cudaGetDeviceProperties(self, device: int) -> Any: ...
    def cudaGetErrorString(self, error: Any) -> Any: ...
    def cudaMalloc(self, nbytes: int) -> Any: ...
    def cudaFree(self, ptr: int) -> Any: ...
    def cudaStreamCreate(self) -> Any: ...
    def cudaStreamSynchronize(self, stream: Stream) -> Any: ...
    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: Any, stream: Stream) -> Any: ...
    def cudaMemcpy2DAsync(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, rows: int, kind: Any, stream: Stream
    ) -> Any: ...


def import_tensorrt() -> Any:  # the untyped tensorrt module: only Builder/Runtime/enums are read off it

    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(
            f"the TensorRT backend needs the `tensorrt` Python package, which is not importable here ({e}); "
            f"install it with `{INSTALL_HINT}` on a machine with an NVIDIA GPU"
        ) from e
    return trt


def import_cudart() -> CudaRuntime:
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
    cuda_runtime: CudaRuntime = cudart
    return cuda_runtime


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

    def stream(self) -> Stream:
        return self.call(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def upload(self, dst: int, arr: np.ndarray, stream: Stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call(self.rt.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes, kind, stream), "cudaMemcpyAsync")

    def download(self, arr: np.ndarray, src: int, stream: Stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call(self.rt.cudaMemcpyAsync(arr.ctypes.data, src, arr.nbytes, kind, stream), "cudaMemcpyAsync")

    def copy_2d(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, rows: int, stream: Stream
    ) -> None:
        """Device-to-device: ``rows`` rows of ``width`` bytes, ``spitch`` apart at src, ``dpitch`` apart at dst."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.call(
            self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, kind, stream),
            "cudaMemcpy2DAsync",
        )

    def sync(self, stream: Stream) -> None:
        self.call(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class TrtLogger:
    """One TensorRT logger per process (TensorRT keeps a reference to the first one it sees)."""

    _logger: Any = None  # a tensorrt.Logger

    @classmethod
    def get(cls, trt: Any) -> Any:
        if cls._logger is None:
            cls._logger = trt.Logger(trt.Logger.WARNING)
        return cls._logger


def device_identity(device: int = 0) -> tuple[str, str, str]:
    """(GPU name, compute capability, TensorRT version) of this machine; BackendError when either is missing."""
    trt = import_tensorrt()
    return (*Cuda(device).device_info(), trt.__version__)


# -- engines ---------------------------------------------------------------------------------------------
class TrtEngine:
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
        self.runtime = runtime
        self.engine: CudaEngine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outs = set(names) - ins
        if ins != set(spec.input_names()) or outs != set(spec.output_names()):
            raise BackendError(
                f"{plan}: engine inputs/outputs do not match the bundle declaration of {spec.name!r}"
            )
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}

    def context(self, profile: int, stream: Stream) -> ExecutionContext:
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
