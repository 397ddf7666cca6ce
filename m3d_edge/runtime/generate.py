"""The generation loop: prefill, then one token at a time over a preallocated KV cache.

Read it top to bottom (gpt-fast's order): :class:`KVCache` holds one fixed-length buffer per layer
tensor; :class:`Decoder` binds it as both past and present of the fused graph, which writes the new
positions in place; :func:`sample` turns logits into a token; :func:`generate` is the loop with its stop
rules and streaming. The loop sees only the protocols of :mod:`m3d_edge.runtime.protocols`, which the
TensorRT backend implements too.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from m3d_edge.bundle import ModelDims, kv_names
from m3d_edge.errors import GenerationError
from m3d_edge.runtime.protocols import Array, BoundSession, CacheT, DecoderBackend

Floats = NDArray[np.float32]


class KVCache:
    """One preallocated ``[1, kv_heads, max_len, head_dim]`` buffer per layer key/value; ``[0, length)`` valid.

    The fused decoder (schema 3) reads the past from and writes the new positions into the same buffer
    (bound as both past and present), so a step neither copies nor allocates the cache, and
    :meth:`truncate` (prefix reuse) only moves the length: later positions are overwritten by the next step.
    """

    def __init__(self, dims: ModelDims, max_len: int, dtype: np.dtype[Any] | str = "float32") -> None:
        shape = (1, dims.num_kv_heads, max_len, dims.head_dim)
        self.buffers = [np.zeros(shape, dtype) for _ in range(2 * dims.num_layers)]
        self.max_len = max_len
        self.length = 0
        self.ids: list[int] = []  # the token ids whose keys/values are cached (prefix reuse)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (no copy: the graph attends to ``[0, length)`` only)."""
        self.length = min(length, self.length)
        self.ids = self.ids[: self.length]


class Decoder:
    """Runs the fused decoder graph over a :class:`KVCache` with IO binding; no per-step allocation.

    ``cache_dtype`` is the graph's past/present dtype (the manifest's declaration: float16 for an fp16
    export, else float32); embeddings in and logits/hidden state out are float32 at every precision.
    """

    def __init__(
        self,
        session: BoundSession,
        dims: ModelDims,
        embed_table: NDArray[np.floating[Any]],
        cache_dtype: str = "float32",
    ) -> None:
        self.session, self.dims, self.embed_table = session, dims, embed_table
        self.cache_dtype = np.dtype(cache_dtype)
        self._bound: weakref.ref[KVCache] | None = None  # the cache whose buffers the session has bound
        self.logits: Floats = np.zeros((1, dims.vocab_size), np.float32)
        self.hidden: Floats = np.zeros((1, dims.hidden_size), np.float32)
        self.token_embeds: Floats = np.zeros((1, 1, dims.hidden_size), np.float32)
        self._mask = np.ones((1, 0), np.int64)

    def new_cache(self, max_len: int) -> KVCache:
        if self._mask.shape[1] < max_len:
            self._mask = np.ones((1, max_len), np.int64)
        return KVCache(self.dims, max_len, self.cache_dtype)

    def step(self, cache: KVCache, embeds: Floats, ids: list[int]) -> None:
        """Feed ``embeds [1, n, H]`` (whose tokens are ``ids``) after the cached prefix; fills logits/hidden."""
        past, n = cache.length, embeds.shape[1]
        if past + n > cache.max_len:
            raise GenerationError(f"KV cache full: {past} + {n} tokens exceed its {cache.max_len} positions")
        inputs: dict[str, Array] = {
            "inputs_embeds": np.ascontiguousarray(embeds, np.float32),
            "attention_mask": self._mask[:, : past + n],  # its width tells the graph the total length
        }
        outputs: dict[str, Array] = {}
        if self._bound is None or self._bound() is not cache:
            # the cache and output buffers never move, so they are bound once per cache, not per token
            # (2 x layers + 2 bindings fewer per step); a cache that died cannot be the one bound
            outputs = {"logits": self.logits, "last_hidden_state": self.hidden}
            for i in range(self.dims.num_layers):
                pk, pv, nk, nv = kv_names(i)
                inputs[pk] = outputs[nk] = cache.buffers[2 * i]  # the same memory: written in place
                inputs[pv] = outputs[nv] = cache.buffers[2 * i + 1]
            self._bound = weakref.ref(cache)
        self.session.run_bound(inputs, outputs)
        cache.length += n
        cache.ids.extend(ids)

    def step_token(self, cache: KVCache, token: int) -> None:
        np.copyto(self.token_embeds[0, 0], self.embed_table[token])
        self.step(cache, self.token_embeds, [token])


@dataclass
class SamplingParams:
    """Greedy by default; with ``do_sample`` the warpers apply in transformers' order."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)


def filtered_probs(logits: Floats, params: SamplingParams, generated: list[int]) -> NDArray[np.float64]:
    """The distribution a token is drawn from: repetition penalty, bias, temperature, top-k, top-p."""
    x: NDArray[np.float64] = logits.astype(np.float64).copy()
    if params.repetition_penalty != 1.0 and generated:
        seen = np.unique(generated)
        x[seen] = np.where(
            x[seen] < 0, x[seen] * params.repetition_penalty, x[seen] / params.repetition_penalty
        )
    for token, bias in params.logit_bias.items():
        x[token] += bias
    if not params.do_sample:
        onehot = np.zeros_like(x)
        onehot[int(np.argmax(x))] = 1.0
        return onehot
    x /= params.temperature
    if 0 < params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x[x < kth] = -np.inf
    p: NDArray[np.float64] = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(p, kind="stable")  # ascending, like transformers' TopPLogitsWarper
        cum = np.cumsum(p[order])
        p[order[:-1][cum[:-1] <= 1.0 - params.top_p]] = 0.0  # the most likely token always stays
        p /= p.sum()
    return p


def sample(logits: Floats, params: SamplingParams, generated: list[int], rng: np.random.Generator) -> int:
    if not params.do_sample and not params.logit_bias and params.repetition_penalty == 1.0:
        return int(np.argmax(logits))
    p = filtered_probs(logits, params, generated)
    if not params.do_sample:
        return int(np.argmax(p))
    return int(rng.choice(p.size, p=p))


class TextStream:
    """Decodes a growing token list and yields only the new, complete text (no half UTF-8 characters)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.emitted = 0

    def push(self, tokens: list[int]) -> str:
        text = self.decode(tokens)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        delta, self.emitted = text[self.emitted :], len(text)
        return delta


@dataclass
class Generation:
    tokens: list[int]
    hidden: list[Floats]  # hidden[k] is the post-norm state that predicted tokens[k]
    stop_reason: str  # "eos" | "stop_string" | "max_new_tokens"
    prefill_seconds: float
    step_seconds: list[float]


def generate(
    decoder: DecoderBackend[CacheT],
    cache: CacheT,
    embeds: Floats,
    ids: list[int],
    *,
    max_new_tokens: int,
    eos_ids: set[int],
    params: SamplingParams | None = None,
    stop_strings: tuple[str, ...] = (),
    decode: Callable[[list[int]], str] | None = None,
    on_text: Callable[[str], None] | None = None,
    keep_hidden: bool = False,
) -> Generation:
    """Generate after the prompt ``embeds [1, n, H]`` (token ids ``ids``), reusing any cached prefix.

    ``cache`` may already hold a prefix of ``ids`` (same study): only the rest is prefilled.
    """
    params = params or SamplingParams()
    rng = np.random.default_rng(params.seed)
    n = len(ids)
    if n + max_new_tokens > cache.max_len:
        raise GenerationError(
            f"prompt of {n} tokens + max_new_tokens {max_new_tokens} exceeds the context length {cache.max_len}"
        )
    reuse = 0
    while reuse < min(cache.length, n - 1) and cache.ids[reuse] == ids[reuse]:
        reuse += 1
    cache.truncate(reuse)

    t0 = time.perf_counter()
    decoder.step(cache, embeds[:, reuse:], ids[reuse:])
    prefill = time.perf_counter() - t0
    stream = TextStream(decode) if (on_text or stop_strings) and decode else None
    tokens: list[int] = []
    hidden: list[Floats] = []
    steps: list[float] = []
    reason = "max_new_tokens"
    while True:
        token = sample(decoder.logits[0], params, tokens, rng)
        tokens.append(token)
        if keep_hidden:
            hidden.append(decoder.hidden[0].copy())
        if stream and decode is not None:
            delta = stream.push(tokens)
            if delta and on_text:
                on_text(delta)
            if stop_strings and any(s in decode(tokens) for s in stop_strings):
                reason = "stop_string"
                break
        if token in eos_ids:
            reason = "eos"
            break
        if len(tokens) >= max_new_tokens:
            break
        t1 = time.perf_counter()
        decoder.step_token(cache, token)
        steps.append(time.perf_counter() - t1)
    return Generation(tokens, hidden, reason, prefill, steps)
