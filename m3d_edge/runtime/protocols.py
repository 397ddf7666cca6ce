"""The interface the generation loop talks to (docs/architecture.md §6), one ``typing.Protocol`` per role.

ONNX Runtime implements it in :mod:`m3d_edge.runtime.backend` (:class:`GraphSession`) and
:mod:`m3d_edge.runtime.generate` (:class:`Decoder`, :class:`KVCache`); TensorRT in
:mod:`m3d_edge.runtime.trt_backend` (:class:`TrtGraphSession`, :class:`TrtDecoder`, :class:`TrtKVCache`).
:func:`m3d_edge.runtime.generate.generate` and the pipeline are annotated with these protocols only, so a
backend is whatever satisfies them (checked at runtime with ``isinstance`` in the tests).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Session(Protocol):
    """One graph: named numpy tensors in, named numpy tensors out; ``seconds`` spent inside the backend."""

    seconds: float

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class BoundSession(Protocol):
    """A session that runs with caller-owned, preallocated buffers bound to inputs and outputs (no copies)."""

    def run_bound(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None: ...


@runtime_checkable
class Cache(Protocol):
    """A preallocated key/value cache of ``max_len`` positions; positions ``[0, length)`` hold ``ids``."""

    max_len: int
    length: int
    ids: list[int]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (prefix reuse; never per token)."""
        ...


@runtime_checkable
class DecoderBackend(Protocol):
    """The decoder over a :class:`Cache`: after ``step``/``step_token``, ``logits [1, V]`` and ``hidden
    [1, H]`` (post-norm) hold the last position's outputs in buffers the caller may read, not keep."""

    logits: np.ndarray
    hidden: np.ndarray

    def new_cache(self, max_len: int) -> Cache: ...

    def step(self, cache: Cache, embeds: np.ndarray, ids: list[int]) -> None: ...

    def step_token(self, cache: Cache, token: int) -> None: ...
