"""The decoder plan over a device-resident ping-pong KV cache (layout in :mod:`m3d_edge.runtime.trt_backend`)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from m3d_edge.bundle import GraphSpec, ModelDims, kv_names
from m3d_edge.errors import BackendError, GenerationError
from m3d_edge.runtime.trt_device import Cuda, Stream, TrtEngine, import_tensorrt
from m3d_edge.runtime.trt_metadata import kv_cache_bytes


class TrtKVCache:
    """Device-resident ping-pong KV cache implementing :class:`m3d_edge.runtime.protocols.Cache`:
    ``length``, ``ids``, ``max_len`` and :meth:`truncate`.

    One allocation holds two slots (front and back); each slot holds, per layer, a keys buffer then a values
    buffer of ``kv_heads * max_len * head_dim`` elements. The valid cache is the head of the front slot's
    buffers, ``[1, kv_heads, length, head_dim]`` contiguous.
    """

    def __init__(self, cuda: Cuda, dims: ModelDims, max_len: int, dtype: DTypeLike, stream: Stream) -> None:
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
        with contextlib.suppress(Exception):
            self.close()


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
        self.e = e = TrtEngine(plan, spec, self.cuda, info)
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
        with contextlib.suppress(Exception):
            self.close()
