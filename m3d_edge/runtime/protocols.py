"""The interface the generation loop talks to (docs/architecture.md §6), one ``typing.Protocol`` per role.

ONNX Runtime implements it in :mod:`m3d_edge.runtime.backend` (:class:`GraphSession`) and
:mod:`m3d_edge.runtime.generate` (:class:`Decoder`, :class:`KVCache`); TensorRT in
:mod:`m3d_edge.runtime.trt_backend` (:class:`TrtGraphSession`, :class:`TrtDecoder`, :class:`TrtKVCache`).
:func:`m3d_edge.runtime.generate.generate` and the pipeline are annotated with these protocols only, so a
backend is whatever satisfies them (checked at runtime with ``isinstance`` in the tests).
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.generic]  # a named tensor of any dtype, as the graphs take and give them


@runtime_checkable
class Graph(Protocol):
    """What provenance and timing read of every graph: the ``provider`` running it, ``seconds`` inside it.

    Read-only members: a plain attribute satisfies them, and so does a property (an on-demand session's
    ``seconds`` is 0 until it opens).
    """

    @property
    def provider(self) -> str: ...

    @property
    def seconds(self) -> float: ...


@runtime_checkable
class Session(Graph, Protocol):
    """One graph: named numpy tensors in, named numpy tensors out."""

    def run(self, inputs: dict[str, Array]) -> dict[str, Array]: ...


@runtime_checkable
class BoundSession(Protocol):
    """A session that runs with caller-owned, preallocated buffers bound to inputs and outputs (no copies);
    a binding stays until the same name is bound again."""

    def run_bound(self, inputs: dict[str, Array], outputs: dict[str, Array]) -> None: ...


@runtime_checkable
class Cache(Protocol):
    """A preallocated key/value cache of ``max_len`` positions; positions ``[0, length)`` hold ``ids``."""

    max_len: int
    length: int
    ids: list[int]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (prefix reuse; never per token)."""
        ...


CacheT = TypeVar("CacheT", bound=Cache)


@runtime_checkable
class DecoderBackend(Protocol[CacheT]):
    """The decoder over its own kind of :class:`Cache` (``CacheT``): after ``step``/``step_token``,
    ``logits [1, V]`` and ``hidden [1, H]`` (post-norm) hold the last position's outputs in buffers the
    caller may read, not keep."""

    logits: NDArray[np.float32]
    hidden: NDArray[np.float32]

    def new_cache(self, max_len: int) -> CacheT: ...

    def step(self, cache: CacheT, embeds: NDArray[np.float32], ids: list[int]) -> None: ...

    def step_token(self, cache: CacheT, token: int) -> None: ...
