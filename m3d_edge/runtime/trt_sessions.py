"""One TensorRT plan of an encoder graph behind the runtime's session protocol, host arrays in and out."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.bundle import GraphSpec
from m3d_edge.errors import BackendError
from m3d_edge.runtime.trt_device import Cuda, TrtEngine, import_tensorrt


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
        self.e = TrtEngine(plan, spec, self.cuda, info)
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
        with contextlib.suppress(Exception):
            self.close()
