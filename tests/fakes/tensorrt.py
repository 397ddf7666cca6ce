"""A fake ``tensorrt`` module whose "engine" is a bundle's ONNX graph run by ONNX Runtime on CPU.

It imitates the TensorRT 10 Python API (10.x; what the backend targets, JetPack 6 included): name-based
I/O only, with no bindings API (removed in 10.0): ``ICudaEngine.num_io_tensors``, ``get_tensor_name``,
``get_tensor_mode`` (``TensorIOMode``), ``get_tensor_dtype`` + ``nptype``, ``get_tensor_profile_shape``,
``num_optimization_profiles``, ``create_execution_context``; ``IExecutionContext.set_input_shape``,
``get_tensor_shape``, ``set_tensor_address``, ``set_optimization_profile_async`` and ``execute_async_v3``;
``Runtime(logger).deserialize_cuda_engine`` and ``Logger.WARNING``. ``__version__`` is ``10.99.0``. A "plan"
is ``{"graph": name}`` as JSON; device memory is the host memory of a :class:`fakes.cuda.FakeCudart`.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fakes.cuda import FakeCudart, device_view
from m3d_edge.bundle import GraphSpec
from m3d_edge.runtime.trt_backend import ShapeRange, profile_names, profile_shapes

VERSION = "10.99.0"


class FakeContext:
    """An execution context: shapes and addresses per tensor name; runs the graph on the bound memory."""

    def __init__(self, engine: FakeEngine) -> None:
        self.e = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addr: dict[str, int] = {}
        self.profile = 0

    def set_optimization_profile_async(self, k: int, stream: object) -> None:
        self.profile = k

    def _in_profile(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.e.get_tensor_profile_shape(name, self.profile)
        return all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        ok = self._in_profile(name, tuple(shape))
        self.shapes[name] = tuple(shape)
        return ok

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        spec = self.e.spec
        axes = {d: s for t in spec.inputs for d, s in zip(t.shape, self.shapes[t.name], strict=True)}
        t = next(t for t in spec.outputs if t.name == name)
        return tuple(axes[d] if isinstance(d, str) else d for d in t.shape)

    def set_tensor_address(self, name: str, addr: int) -> None:
        self.addr[name] = addr

    def _check_bindings(self) -> None:
        """Inputs inside the profile, every tensor inside one device allocation, no output over an input."""
        spec = self.e.spec
        for name in spec.input_names():
            assert self._in_profile(name, self.shapes[name]), name
        regions = {}
        for t in spec.inputs + spec.outputs:
            n = int(np.prod(self.get_tensor_shape(t.name))) * np.dtype(t.dtype).itemsize
            regions[t.name] = (self.addr[t.name], self.addr[t.name] + n)
            assert n == 0 or self.e.cudart._inside(self.addr[t.name], n), t.name
        for o in spec.output_names():
            for i in spec.input_names():
                (a, b), (c, d) = regions[o], regions[i]
                assert b <= c or d <= a or a == b or c == d, f"{o} overlaps {i}"

    def execute_async_v3(self, stream: object) -> bool:
        self._check_bindings()
        spec = self.e.spec
        feeds = {
            t.name: device_view(self.addr[t.name], self.shapes[t.name], t.dtype).copy() for t in spec.inputs
        }
        outs = self.e.session.run(None, feeds)
        for t, value in zip(spec.outputs, outs, strict=True):
            assert value.shape == self.get_tensor_shape(t.name)
            device_view(self.addr[t.name], value.shape, t.dtype)[...] = value
        return True


class FakeEngine:
    """A "deserialized plan": the graph's declaration, its profiles and an ONNX Runtime session of it."""

    def __init__(
        self, spec: GraphSpec, onnx_file: Path, shapes: dict[str, list[ShapeRange]], cudart: FakeCudart
    ):
        self.spec, self.shapes, self.cudart = spec, shapes, cudart
        self.session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        self.names = spec.input_names() + spec.output_names()
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(profile_names(spec.name))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "in" if name in self.spec.input_names() else "out"

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return np.dtype(next(t.dtype for t in self.spec.inputs + self.spec.outputs if t.name == name))

    def get_tensor_profile_shape(self, name: str, k: int) -> ShapeRange:
        return self.shapes[name][k]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeRuntime:
    def __init__(self, load: Callable[[bytes], FakeEngine]) -> None:
        self.load = load

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
        return self.load(data)


def fake_tensorrt(bundle: Path, manifest: Any, max_seq: int, cudart: FakeCudart) -> types.ModuleType:
    """A ``tensorrt`` module whose plans run ``bundle``'s TensorRT graphs, built for ``max_seq`` new tokens."""
    specs, dims = manifest.tensorrt_specs(), manifest.dims

    def load(data: bytes) -> FakeEngine:
        graph = json.loads(data)["graph"]
        spec, onnx_file = specs[graph], bundle / manifest.tensorrt_entry(graph).file
        return FakeEngine(spec, onnx_file, profile_shapes(spec, dims, 1, max_seq, None), cudart)

    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dt: dt
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=0: None})
    trt.Runtime = lambda logger: FakeRuntime(load)
    return trt
