"""Decoder graphs written layer by layer straight from the checkpoint's safetensors shards.

Why our own writer and not onnxruntime-genai's model builder: the builder produces the same fused op set
(GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits) and has ``exclude_embeds``,
``prune_lm_head`` and ``include_hidden_states``, but it loads the whole model first (measured: ~21 GB for
FP32 and ~35 GB for INT4 at Phi-3-4B size, over a 12 GB bound) and its hidden-state output is every
position, not the last one. This writer never holds more than one layer: each weight is read from the
memory-mapped shard (``safetensors.safe_open``), transposed, optionally quantized, appended to the graph's
external-data file at a page-aligned offset and freed; the ONNX proto itself only holds nodes and
external-data references (kilobytes). The builder stays a benchmark peer (``benchmarks/genai_peer.py``).

Two graphs share one weight pass:

* ``fused`` (ONNX Runtime, the CPU default): ``com.microsoft.GroupQueryAttention`` on packed QKV with
  fused rotary (``do_rotary`` over cos/sin caches) over a past/present buffer of fixed length shared in
  place (the runtime binds past and present to the same memory: nothing is concatenated or copied),
  ``SkipSimplifiedLayerNormalization`` for every residual add + RMSNorm, weights as MatMul (fp32; fp16
  for GPUs, with float16 activations and cache) or ``com.microsoft.MatMulNBits`` (int8/int4, block-wise,
  built from the numpy weights with onnxruntime's own block quantizer).
* ``standard`` (TensorRT's ONNX parser takes no ``com.microsoft`` op): plain ONNX ops, schema-2 cache
  contract (past in, past + new out), rotary by ``position_ids``; FP32 weights shared with the fused FP32
  graph's data file.

Both return logits and the post-final-norm hidden state of the last position only.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from m3d_edge.bundle import ModelDims, kv_names
from m3d_edge.choices import EXPORT_PRECISIONS
from m3d_edge.errors import ExportError
from m3d_edge.export.checkpoint import LamedConfig
from m3d_edge.export.decoder_weights import (
    LayerWeights,
    Quant,
    ShardReader,
    quantize_blockwise,
    read_layer,
    rope_tables,
)
from m3d_edge.export.onnx_store import ExternalData, Graph, save_model, value_info


def _linear(g: Graph, x: str, w_kn: np.ndarray, name: str, quant: Quant, shared: dict) -> str:
    """x @ W for a ``[K, N]`` weight, as MatMul (fp32, fp16) or MatMulNBits (int8/int4)."""
    if quant.bits is None:
        proto = g.store.add(name, w_kn.astype(quant.float_dtype, copy=False))
        shared[name] = proto
        return g.op1("MatMul", [x, g.shared(proto)])
    k, n = w_kn.shape
    packed, scales, zp = quantize_blockwise(w_kn, quant.bits, quant.block_size, quant.symmetric)
    inputs = [x, g.weight(f"{name}.q{quant.bits}", packed), g.weight(f"{name}.scales", scales)]
    if zp is not None:
        inputs.append(g.weight(f"{name}.zero_points", zp))
    return g.op1(
        "MatMulNBits",
        inputs,
        domain="com.microsoft",
        K=k,
        N=n,
        bits=quant.bits,
        block_size=quant.block_size,
        accuracy_level=quant.accuracy_level,
    )


# -- graph bodies ------------------------------------------------------------------------------------
def _declare_io(g: Graph, dims: ModelDims, position_ids: bool) -> None:
    """The inputs and outputs both decoders share (the cache tensors are declared per layer)."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    g.inputs += [
        value_info("inputs_embeds", f32, ["batch", "sequence", dims.hidden_size]),
        value_info("attention_mask", i64, ["batch", "total"]),
    ]
    if position_ids:
        g.inputs.append(value_info("position_ids", i64, ["batch", "sequence"]))
    g.outputs += [
        value_info("logits", f32, ["batch", dims.vocab_size]),
        value_info("last_hidden_state", f32, ["batch", dims.hidden_size]),
    ]


class FusedDecoder:
    """GroupQueryAttention graph over a shared fixed-length cache (see the module docstring).

    At fp16 every activation, float weight and the cache are float16 (what GPUs run); the contract's
    float32 ``inputs_embeds`` is cast on the way in and logits/hidden state on the way out.
    """

    def __init__(
        self, g: Graph, dims: ModelDims, eps: float, cos: np.ndarray, sin: np.ndarray, quant: Quant
    ) -> None:
        self.g, self.dims, self.eps = g, dims, eps
        self.dtype = quant.float_dtype
        self.onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        _declare_io(g, dims, position_ids=False)
        # GQA's sequence bookkeeping from the mask: seqlens_k = valid length - 1, total = mask width
        summed = g.op1(
            "ReduceSum", ["attention_mask", g.const("axes_1", np.array([1], np.int64))], keepdims=0
        )
        minus = g.op1("Sub", [summed, g.const("one_i64", np.array(1, np.int64))])
        self.seqlens = g.op1("Cast", [minus], to=TensorProto.INT32)
        width = g.op1("Gather", [g.op1("Shape", ["attention_mask"]), g.const("idx_1", np.array(1, np.int64))])
        self.total = g.op1("Cast", [width], to=TensorProto.INT32)
        self.cos = g.weight("rotary.cos_cache", cos.astype(self.dtype))
        self.sin = g.weight("rotary.sin_cache", sin.astype(self.dtype))
        self.residual = "inputs_embeds"
        if self.dtype != np.float32:
            self.residual = g.op1("Cast", ["inputs_embeds"], to=self.onnx_type)
        self.pending: str | None = None  # the MLP output not yet added to the residual

    def _norm_after(self, delta: str | None, gamma: str) -> str:
        """RMSNorm of residual (+ delta): Skip variant fuses the add and keeps the sum as the new residual."""
        g = self.g
        if delta is None:
            return g.op1("SimplifiedLayerNormalization", [self.residual, gamma], axis=-1, epsilon=self.eps)
        out, _, _, total = g.op(
            "SkipSimplifiedLayerNormalization",
            [delta, self.residual, gamma],
            4,
            "com.microsoft",
            epsilon=self.eps,
        )
        self.residual = total
        return out

    def layer(self, i: int, w: LayerWeights, quant: Quant, shared: dict) -> None:
        g, d = self.g, self.dims
        pk, pv, nk, nv = kv_names(i)
        kv = ["batch", d.num_kv_heads, "max_length", d.head_dim]
        g.inputs += [value_info(pk, self.onnx_type, kv), value_info(pv, self.onnx_type, kv)]
        g.outputs += [value_info(nk, self.onnx_type, kv), value_info(nv, self.onnx_type, kv)]
        p = f"model.layers.{i}."
        h = self._norm_after(self.pending, self._gamma(p + "input_layernorm.weight", w.ln1, shared))
        qkv = _linear(g, h, w.qkv, p + "self_attn.qkv_proj.weight.T", quant, shared)
        attn, present_k, present_v = g.op(
            "GroupQueryAttention",
            [qkv, "", "", pk, pv, self.seqlens, self.total, self.cos, self.sin],
            3,
            "com.microsoft",
            num_heads=d.num_heads,
            kv_num_heads=d.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=1.0 / math.sqrt(d.head_dim),
        )
        g.nodes.append(helper.make_node("Identity", [present_k], [nk], name=f"present_k_{i}"))
        g.nodes.append(helper.make_node("Identity", [present_v], [nv], name=f"present_v_{i}"))
        o = _linear(g, attn, w.o, p + "self_attn.o_proj.weight.T", quant, shared)
        h2 = self._norm_after(o, self._gamma(p + "post_attention_layernorm.weight", w.ln2, shared))
        self.pending = _mlp(g, h2, w, p, quant, shared)

    def _gamma(self, name: str, w: np.ndarray, shared: dict) -> str:
        """An RMSNorm weight: the fp32 one shared with the standard graph, or this graph's own fp16 copy."""
        if self.dtype == np.float32:
            return self.g.shared(_norm_proto(self.g, name, w, shared))
        return self.g.weight(f"{name}.fp16", w.astype(self.dtype))

    def finish(self, norm: np.ndarray, lm_head_kn: np.ndarray, quant: Quant, shared: dict) -> None:
        g = self.g
        hidden = self._norm_after(self.pending, self._gamma("model.norm.weight", norm, shared))
        last = _last_position(g, hidden)
        logits = _linear(g, last, lm_head_kn, "lm_head.weight.T", quant, shared)
        if self.dtype != np.float32:  # the contract's outputs are float32
            last, logits = (g.op1("Cast", [v], to=TensorProto.FLOAT) for v in (last, logits))
        _name_outputs(g, last, logits)


def _norm_proto(g: Graph, name: str, w: np.ndarray, shared: dict) -> TensorProto:
    if name not in shared:
        shared[name] = g.store.add(name, w)
    return shared[name]


def _mlp(g: Graph, h: str, w: LayerWeights, p: str, quant: Quant, shared: dict) -> str:
    inter = w.down.shape[0]
    gate_up = _linear(g, h, w.gate_up, p + "mlp.gate_up_proj.weight.T", quant, shared)
    gate, up = g.op(
        "Split", [gate_up, g.const(f"split_{inter}", np.array([inter, inter], np.int64))], 2, axis=-1
    )
    act = g.op1("Mul", [gate, g.op1("Sigmoid", [gate])])  # SiLU
    return _linear(g, g.op1("Mul", [act, up]), w.down, p + "mlp.down_proj.weight.T", quant, shared)


def _last_position(g: Graph, hidden: str) -> str:
    """The hidden state of the last position, [B, H]."""
    return g.op1("Gather", [hidden, g.const("idx_last", np.array(-1, np.int64))], axis=1)


def _name_outputs(g: Graph, last: str, logits: str) -> None:
    """Both decoders' outputs besides the cache: the last position's post-norm state and its logits."""
    for value, name in ((last, "last_hidden_state"), (logits, "logits")):
        g.nodes.append(helper.make_node("Identity", [value], [name], name=name))


class StandardDecoder:
    """Plain ONNX ops only (TensorRT): schema-2 cache (past in, whole cache out), rotary by position_ids."""

    def __init__(self, g: Graph, dims: ModelDims, eps: float, cos: np.ndarray, sin: np.ndarray) -> None:
        self.g, self.dims, self.eps = g, dims, eps
        _declare_io(g, dims, position_ids=True)
        full_cos = np.concatenate([cos, cos], axis=1)  # [max_pos, hd]
        full_sin = np.concatenate([sin, sin], axis=1)
        c = g.op1("Gather", [g.weight("rotary.cos_full", full_cos), "position_ids"])  # [B, S, hd]
        s = g.op1("Gather", [g.weight("rotary.sin_full", full_sin), "position_ids"])
        ax1 = g.const("axes_1", np.array([1], np.int64))
        self.cos, self.sin = g.op1("Unsqueeze", [c, ax1]), g.op1("Unsqueeze", [s, ax1])  # [B, 1, S, hd]
        # additive mask [B, 1, S, T]: key j visible to query i when j <= past + i and the mask keeps j
        shape_m = g.op1("Shape", ["attention_mask"])
        total = g.op1("Gather", [shape_m, g.const("idx_1", np.array(1, np.int64))])
        seq = g.op1("Gather", [g.op1("Shape", ["inputs_embeds"]), g.const("idx_1", np.array(1, np.int64))])
        past = g.op1("Sub", [total, seq])
        zero, one = g.const("zero_i64", np.array(0, np.int64)), g.const("one_i64", np.array(1, np.int64))
        k_pos = g.op1("Range", [zero, total, one])  # [T]
        q_pos = g.op1("Unsqueeze", [g.op1("Range", [past, total, one]), ax1])  # [S, 1]
        causal = g.op1("LessOrEqual", [k_pos, q_pos])  # [S, T]
        keep = g.op1(
            "Cast",
            [g.op1("Unsqueeze", ["attention_mask", g.const("axes_12", np.array([1, 2], np.int64))])],
            to=TensorProto.BOOL,
        )
        allowed = g.op1("And", [causal, keep])  # [B, 1, S, T]
        self.bias = g.op1(
            "Where",
            [
                allowed,
                g.const("zero_f", np.array(0.0, np.float32)),
                g.const("min_f", np.array(np.finfo(np.float32).min, np.float32)),
            ],
        )
        self.residual = "inputs_embeds"
        self.pending: str | None = None

    def _rms(self, x: str, gamma: str) -> str:
        g = self.g
        var = g.op1("ReduceMean", [g.op1("Mul", [x, x])], axes=[-1], keepdims=1)
        inv = g.op1(
            "Reciprocal",
            [g.op1("Sqrt", [g.op1("Add", [var, g.const("eps", np.array(self.eps, np.float32))])])],
        )
        return g.op1("Mul", [g.op1("Mul", [x, inv]), gamma])

    def _norm_after(self, delta: str | None, gamma: str) -> str:
        if delta is not None:
            self.residual = self.g.op1("Add", [self.residual, delta])
        return self._rms(self.residual, gamma)

    def _heads(self, x: str, heads: int) -> str:
        """[B, S, heads * hd] -> [B, heads, S, hd]."""
        g = self.g
        shape = g.const(f"heads_{heads}", np.array([0, 0, heads, self.dims.head_dim], np.int64))
        return g.op1("Transpose", [g.op1("Reshape", [x, shape])], perm=[0, 2, 1, 3])

    def _rotate(self, x: str) -> str:
        g = self.g
        half = self.dims.head_dim // 2
        x1, x2 = g.op("Split", [x, g.const("split_half", np.array([half, half], np.int64))], 2, axis=-1)
        rot = g.op1("Concat", [g.op1("Neg", [x2]), x1], axis=-1)
        return g.op1("Add", [g.op1("Mul", [x, self.cos]), g.op1("Mul", [rot, self.sin])])

    def _repeat_kv(self, x: str) -> str:
        d, g = self.dims, self.g
        rep = d.num_heads // d.num_kv_heads
        if rep == 1:
            return x
        x5 = g.op1("Unsqueeze", [x, g.const("axes_2", np.array([2], np.int64))])  # [B, kv, 1, T, hd]
        shape5 = g.op1("Shape", [x5])
        reps = g.op1(
            "Concat",
            [
                g.const("ones2", np.array([1, 1], np.int64)),
                g.const("rep", np.array([rep], np.int64)),
                g.const("ones2b", np.array([1, 1], np.int64)),
            ],
            axis=0,
        )
        tiled = g.op1("Tile", [x5, reps])
        del shape5
        return g.op1(
            "Reshape", [tiled, g.const("bnthd", np.array([0, d.num_heads, -1, d.head_dim], np.int64))]
        )

    def layer(self, i: int, w: LayerWeights, quant: Quant, shared: dict) -> None:
        g, d = self.g, self.dims
        f32 = TensorProto.FLOAT
        pk, pv, nk, nv = kv_names(i)
        g.inputs += [value_info(n, f32, ["batch", d.num_kv_heads, "past", d.head_dim]) for n in (pk, pv)]
        g.outputs += [value_info(n, f32, ["batch", d.num_kv_heads, "total", d.head_dim]) for n in (nk, nv)]
        p = f"model.layers.{i}."
        h = self._norm_after(self.pending, g.shared(shared[p + "input_layernorm.weight"]))
        qkv = g.op1("MatMul", [h, g.shared(shared[p + "self_attn.qkv_proj.weight.T"])])
        sizes = np.array(
            [d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.num_kv_heads * d.head_dim], np.int64
        )
        q, k, v = g.op("Split", [qkv, g.const("split_qkv", sizes)], 3, axis=-1)
        q = self._rotate(self._heads(q, d.num_heads))
        k = self._rotate(self._heads(k, d.num_kv_heads))
        v = self._heads(v, d.num_kv_heads)
        g.nodes.append(helper.make_node("Concat", [pk, k], [nk], axis=2, name=f"present_k_{i}"))
        g.nodes.append(helper.make_node("Concat", [pv, v], [nv], axis=2, name=f"present_v_{i}"))
        kt = g.op1("Transpose", [self._repeat_kv(nk)], perm=[0, 1, 3, 2])
        scores = g.op1(
            "Mul",
            [g.op1("MatMul", [q, kt]), g.const("scale", np.array(1.0 / math.sqrt(d.head_dim), np.float32))],
        )
        probs = g.op1("Softmax", [g.op1("Add", [scores, self.bias])], axis=-1)
        ctx = g.op1("Transpose", [g.op1("MatMul", [probs, self._repeat_kv(nv)])], perm=[0, 2, 1, 3])
        ctx = g.op1("Reshape", [ctx, g.const("bsh", np.array([0, 0, d.num_heads * d.head_dim], np.int64))])
        o = g.op1("MatMul", [ctx, g.shared(shared[p + "self_attn.o_proj.weight.T"])])
        h2 = self._norm_after(o, g.shared(shared[p + "post_attention_layernorm.weight"]))
        inter = w.down.shape[0]
        gate_up = g.op1("MatMul", [h2, g.shared(shared[p + "mlp.gate_up_proj.weight.T"])])
        gate, up = g.op(
            "Split", [gate_up, g.const(f"split_{inter}", np.array([inter, inter], np.int64))], 2, axis=-1
        )
        act = g.op1("Mul", [gate, g.op1("Sigmoid", [gate])])
        self.pending = g.op1(
            "MatMul", [g.op1("Mul", [act, up]), g.shared(shared[p + "mlp.down_proj.weight.T"])]
        )

    def finish(self, norm: np.ndarray, lm_head_kn: np.ndarray, quant: Quant, shared: dict) -> None:
        g = self.g
        hidden = self._norm_after(self.pending, g.shared(shared["model.norm.weight"]))
        last = _last_position(g, hidden)
        _name_outputs(g, last, g.op1("MatMul", [last, g.shared(shared["lm_head.weight.T"])]))


# -- the writer --------------------------------------------------------------------------------------
@dataclass
class DecoderFiles:
    """What :func:`write_decoders` produced (paths relative to the bundle)."""

    fused: str
    standard: str | None
    data: list[str]
    settings: dict[str, object]


@contextmanager
def _cleanup_on_error(paths: list[Path]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for p in paths:
            p.unlink(missing_ok=True)
        raise


def _write_layers(
    src: ShardReader,
    family: str,
    builders: list[FusedDecoder | StandardDecoder],
    quant: Quant,
    n_layers: int,
    progress: Callable[[int, int], None] | None,
) -> dict[str, TensorProto]:
    """Every layer into every graph, one layer's weights in memory at a time; returns the shared references."""
    shared: dict[str, TensorProto] = {}
    for i in range(n_layers):
        w = read_layer(src, family, i)
        for b in builders:
            b.layer(i, w, quant, shared)
        del w
        shared = {k: v for k, v in shared.items()}  # references only; the arrays are on disk
        gc.collect()
        if progress:
            progress(i + 1, n_layers)
    return shared


def _write_head(
    src: ShardReader,
    builders: list[FusedDecoder | StandardDecoder],
    quant: Quant,
    shared: dict[str, TensorProto],
) -> None:
    """The final norm and the LM head (tied to the embeddings when the checkpoint has no lm_head)."""
    norm = src.get("model.norm.weight")
    head_name = "lm_head.weight" if "lm_head.weight" in src else "model.embed_tokens.weight"
    head = np.ascontiguousarray(src.get(head_name).T)
    for b in builders:
        b.finish(norm, head, quant, shared)


def write_decoders(
    ckpt: Path,
    cfg: LamedConfig,
    dims: ModelDims,
    out: Path,
    *,
    precision: str = "fp32",
    standard: bool = True,
    fused_name: str = "decoder.onnx",
    standard_name: str = "decoder_std.onnx",
    layers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DecoderFiles:
    """Write the fused decoder (and, for fp32, the standard-op one sharing its data file) layer by layer.

    ``layers`` truncates to the first k layers (validation of a model too large for a torch reference).
    """
    if precision not in EXPORT_PRECISIONS:
        raise ExportError(
            f"unknown decoder precision {precision!r} (choose from {', '.join(EXPORT_PRECISIONS)})"
        )
    if standard and precision != "fp32":
        raise ExportError(
            "the standard-op (TensorRT) decoder is written in fp32 only; TensorRT picks FP16 itself"
        )
    quant = Quant(precision)
    out = Path(out)
    n_layers = dims.num_layers if layers is None else layers
    src = ShardReader(ckpt)
    data = out / f"{fused_name}.data"
    paths = [out / fused_name, data] + ([out / standard_name] if standard else [])
    store = ExternalData(data)
    eps = float(cfg.raw.get("rms_norm_eps", 1e-5))
    cos, sin = rope_tables(cfg, dims, dims.max_position_embeddings)
    with _cleanup_on_error(paths):
        fused_g = Graph("m3d_decoder_fused", store)
        builders: list[FusedDecoder | StandardDecoder] = [FusedDecoder(fused_g, dims, eps, cos, sin, quant)]
        std_g = None
        if standard:
            std_g = Graph("m3d_decoder_standard", store)
            builders.append(StandardDecoder(std_g, dims, eps, cos, sin))
        shared = _write_layers(src, cfg.family, builders, quant, n_layers, progress)
        _write_head(src, builders, quant, shared)
        store.close()
        # onnx's checker does not know onnxruntime's SimplifiedLayerNormalization (default domain); the
        # exporter validates the fused graph by running it instead
        save_model(fused_g.model(), out / fused_name, check=False)
        if std_g is not None:
            save_model(std_g.model(), out / standard_name, check=True)
    return DecoderFiles(
        fused=fused_name,
        standard=standard_name if standard else None,
        data=[data.name],
        settings=quant.settings(),
    )
