"""A fake cuda-python ``cudart`` (``cuda.bindings.runtime``, cuda-python 12.x) whose device is host memory.

It keeps cudart's calling convention: every call returns ``(cudaError_t, *values)``, enums are attribute
namespaces (``cudaError_t.cudaSuccess``, ``cudaMemcpyKind``), pointers are plain ints (here host addresses).
Only the calls :class:`m3d_edge.runtime.trt_device.Cuda` makes exist; copies are counted per direction so
tests can check what crosses between host and device.
"""

from __future__ import annotations

import ctypes
import types
from typing import Any

import numpy as np
from numpy.typing import DTypeLike


class FakeCudart:
    """cudart's calling convention ((err, *values) tuples) over host memory: pointers are host addresses."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = types.SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.d2d_bytes = 0

    def cudaSetDevice(self, d: int) -> tuple[int]:
        return (0,)

    def cudaGetDeviceProperties(self, d: int) -> tuple[int, Any]:
        return (0, types.SimpleNamespace(name=b"Fake GPU\x00\x00", major=9, minor=0))

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        return (0, b"fake error")

    def cudaMalloc(self, n: int) -> tuple[int, int]:
        block = np.full(n, 0xFF, np.uint8)  # garbage, like real device memory
        self.blocks[block.ctypes.data] = block
        return (0, block.ctypes.data)

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.blocks.pop(ptr, None)
        return (0,)

    def cudaStreamCreate(self) -> tuple[int, int]:
        return (0, 7)

    def cudaStreamSynchronize(self, s: object) -> tuple[int]:
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: object) -> tuple[int]:
        if kind == 1:
            self.h2d_bytes += n
        else:
            self.d2h_bytes += n
        assert kind in (1, 2)
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaMemcpy2DAsync(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int, stream: object
    ) -> tuple[int]:
        assert kind == 3 and width <= min(dpitch, spitch)
        assert self._inside(dst, (height - 1) * dpitch + width) and self._inside(
            src, (height - 1) * spitch + width
        )
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        self.d2d_bytes += width * height
        return (0,)

    def _inside(self, ptr: int, n: int) -> bool:
        return any(base <= ptr and ptr + n <= base + b.size for base, b in self.blocks.items())


def device_view(addr: int, shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray:
    """The fake device memory at ``addr`` as an array (a view: writes go to the "device")."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = (ctypes.c_char * max(n, 1)).from_address(addr)
    return np.frombuffer(buf, np.uint8, count=n).view(dtype).reshape(shape)
