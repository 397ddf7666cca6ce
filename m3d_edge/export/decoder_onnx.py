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
  ``SkipSimplifiedLayerNormalization`` for every residual add + RMSNorm, weights as MatMul (fp32) or
  ``com.microsoft.MatMulNBits`` (int8/int4, block-wise, built from the numpy weights with onnxruntime's
  own block quantizer).
* ``standard`` (TensorRT's ONNX parser takes no ``com.microsoft`` op): plain ONNX ops, schema-2 cache
  contract (past in, past + new out), rotary by ``position_ids``; FP32 weights shared with the fused FP32
  graph's data file.

Both return logits and the post-final-norm hidden state of the last position only.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from m3d_edge.bundle import ModelDims, kv_names
from m3d_edge.errors import ExportError
from m3d_edge.export.checkpoint import INDEX, LamedConfig, read_json

OPSET = 17
MS_OPSET = 1
IR_VERSION = 10
ALIGN = 4096  # page-aligned external data lets onnxruntime map it instead of reading it
PRECISIONS = ("fp32", "int8", "int4")
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: without it ORT has no fast CPU kernel


class ShardReader:
    """Lazy, memory-mapped access to the tensors of a sharded safetensors checkpoint."""

    def __init__(self, ckpt: Path) -> None:
        from safetensors import safe_open

        self.ckpt = Path(ckpt)
        index = self.ckpt / INDEX
        if index.is_file():
            self.where = dict(read_json(index).get("weight_map", {}))
        elif (self.ckpt / "model.safetensors").is_file():
            with safe_open(str(self.ckpt / "model.safetensors"), framework="np") as f:
                self.where = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ExportError(f"{self.ckpt}: the streamed exporter reads safetensors only (no {INDEX})")
        self._open = safe_open

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        """One tensor as a private float32 array.

        The shard is opened (memory-mapped) for this tensor only and closed again: mapped pages count as
        resident memory while the map lives, so keeping every shard open would add the whole checkpoint
        to the exporter's RSS (measured: 17.4 GB peak for Phi-3-4B int4 before this).
        """
        if name not in self.where:
            raise ExportError(f"{self.ckpt}: weight {name} is missing")
        path = self.ckpt / self.where[name]
        if not path.is_file():
            raise ExportError(f"{path}: missing shard (listed in {INDEX})")
        with self._open(str(path), framework="np") as f:
            return np.array(f.get_tensor(name), dtype=np.float32, copy=True)


class ExternalData:
    """Appends tensors to one external-data file at aligned offsets and returns their references."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self.offset = 0
        self.written: dict[str, TensorProto] = {}

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        if name in self.written:
            return self.written[name]
        array = np.ascontiguousarray(array)
        pad = (-self.offset) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        data = memoryview(array).cast("B")
        self.file.write(data)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (
            ("location", self.path.name),
            ("offset", str(self.offset)),
            ("length", str(data.nbytes)),
        ):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.offset += data.nbytes
        self.written[name] = t
        return t

    def close(self) -> None:
        self.file.close()


class Graph:
    """Nodes and initializer references of one graph under construction."""

    def __init__(self, name: str, store: ExternalData) -> None:
        self.name, self.store = name, store
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        self._n += 1
        outs = [f"/{op_type.lower()}_{self._n}/{i}" for i in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}", domain=domain, **attrs)
        )
        return outs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]

    def const(self, name: str, array: np.ndarray) -> str:
        """A small constant stored inline."""
        if name not in self.initializers:
            self.initializers[name] = onnx.numpy_helper.from_array(np.asarray(array), name)
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """A large constant stored in the external-data file."""
        self.initializers[name] = self.store.add(name, array)
        return name

    def shared(self, proto: TensorProto) -> str:
        """A constant another graph already wrote to the shared data file."""
        self.initializers[proto.name] = proto
        return proto.name

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, initializer=list(self.initializers.values())
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)],
            producer_name="m3d-edge",
        )
        m.ir_version = IR_VERSION
        return m


# -- weights -----------------------------------------------------------------------------------------
def quantize_blockwise(w_kn: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """onnxruntime's MatMulNBits layout of a ``[K, N]`` weight: (packed, scales, zero points or None)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w_kn.shape
    k_blocks = -(-k // block_size)
    if k_blocks * block_size != k:
        w_kn = np.pad(w_kn, ((0, k_blocks * block_size - k), (0, 0)))
    kpack = 8 // bits
    packed = np.zeros((n, k_blocks, block_size // kpack), np.uint8)
    zero_points = np.zeros((n, -(-k_blocks // kpack)), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w_kn, np.float32), scales, zero_points, block_size, n, k, symmetric)
    return packed, scales, None if symmetric else zero_points


@dataclass(frozen=True)
class Quant:
    precision: str = "fp32"
    block_size: int = BLOCK_SIZE
    accuracy_level: int = ACCURACY_LEVEL

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.precision)

    @property
    def symmetric(self) -> bool:
        return self.bits == 8  # int4 keeps per-block zero points (closer to FP32), as calibration does

    def settings(self) -> dict[str, object]:
        if self.bits is None:
            return {"precision": self.precision}
        return {
            "quantizer": "m3d_edge.export.decoder_onnx (onnxruntime quantize_matmul_nbits kernels)",
            "op": "com.microsoft.MatMulNBits",
            "bits": self.bits,
            "block_size": self.block_size,
            "accuracy_level": self.accuracy_level,
            "symmetric": self.symmetric,
        }


def _linear(g: Graph, x: str, w_kn: np.ndarray, name: str, quant: Quant, shared: dict) -> str:
    """x @ W for a ``[K, N]`` weight, as MatMul (fp32) or MatMulNBits (int8/int4)."""
    if quant.bits is None:
        proto = g.store.add(name, w_kn)
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


@dataclass
class LayerWeights:
    """One decoder layer in the fused layout: packed QKV ``[H, (nh + 2kv) hd]``, gate|up ``[H, 2I]``."""

    ln1: np.ndarray
    ln2: np.ndarray
    qkv: np.ndarray
    o: np.ndarray
    gate_up: np.ndarray
    down: np.ndarray


def read_layer(src: ShardReader, family: str, i: int) -> LayerWeights:
    p = f"model.layers.{i}."
    if family == "phi3":
        qkv = src.get(p + "self_attn.qkv_proj.weight")
        gate_up = src.get(p + "mlp.gate_up_proj.weight")
    else:
        qkv = np.concatenate([src.get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        gate_up = np.concatenate([src.get(p + "mlp.gate_proj.weight"), src.get(p + "mlp.up_proj.weight")])
    return LayerWeights(
        ln1=src.get(p + "input_layernorm.weight"),
        ln2=src.get(p + "post_attention_layernorm.weight"),
        qkv=np.ascontiguousarray(qkv.T),
        o=np.ascontiguousarray(src.get(p + "self_attn.o_proj.weight").T),
        gate_up=np.ascontiguousarray(gate_up.T),
        down=np.ascontiguousarray(src.get(p + "mlp.down_proj.weight").T),
    )


def rope_tables(cfg: LamedConfig, dims: ModelDims, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[length, head_dim / 2]`` of the default (unscaled) rotary embedding."""
    raw = cfg.raw
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ExportError(f"config.json: rope scaling {scaling!r} is not supported by the streamed exporter")
    if float(raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ExportError("config.json: partial rotary embeddings are not supported by the streamed exporter")
    theta = float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)
    hd = dims.head_dim
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    freqs = np.outer(np.arange(length, dtype=np.float32), inv)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


# -- graph bodies ------------------------------------------------------------------------------------
def _value(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


class FusedDecoder:
    """GroupQueryAttention graph over a shared fixed-length cache (see the module docstring)."""

    def __init__(self, g: Graph, dims: ModelDims, eps: float, cos: np.ndarray, sin: np.ndarray) -> None:
        self.g, self.dims, self.eps = g, dims, eps
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        g.inputs += [
            _value("inputs_embeds", f32, ["batch", "sequence", dims.hidden_size]),
            _value("attention_mask", i64, ["batch", "total"]),
        ]
        g.outputs += [
            _value("logits", f32, ["batch", dims.vocab_size]),
            _value("last_hidden_state", f32, ["batch", dims.hidden_size]),
        ]
        # GQA's sequence bookkeeping from the mask: seqlens_k = valid length - 1, total = mask width
        summed = g.op1(
            "ReduceSum", ["attention_mask", g.const("axes_1", np.array([1], np.int64))], keepdims=0
        )
        minus = g.op1("Sub", [summed, g.const("one_i64", np.array(1, np.int64))])
        self.seqlens = g.op1("Cast", [minus], to=TensorProto.INT32)
        width = g.op1("Gather", [g.op1("Shape", ["attention_mask"]), g.const("idx_1", np.array(1, np.int64))])
        self.total = g.op1("Cast", [width], to=TensorProto.INT32)
        self.cos = g.weight("rotary.cos_cache", cos)
        self.sin = g.weight("rotary.sin_cache", sin)
        self.residual = "inputs_embeds"
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
        f32 = TensorProto.FLOAT
        pk, pv, nk, nv = kv_names(i)
        kv = ["batch", d.num_kv_heads, "max_length", d.head_dim]
        g.inputs += [_value(pk, f32, kv), _value(pv, f32, kv)]
        g.outputs += [_value(nk, f32, kv), _value(nv, f32, kv)]
        p = f"model.layers.{i}."
        h = self._norm_after(
            self.pending, g.shared(_norm_proto(g, p + "input_layernorm.weight", w.ln1, shared))
        )
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
        h2 = self._norm_after(
            o, g.shared(_norm_proto(g, p + "post_attention_layernorm.weight", w.ln2, shared))
        )
        self.pending = _mlp(g, h2, w, p, quant, shared)

    def finish(self, norm: np.ndarray, lm_head_kn: np.ndarray, quant: Quant, shared: dict) -> None:
        g = self.g
        hidden = self._norm_after(self.pending, g.shared(_norm_proto(g, "model.norm.weight", norm, shared)))
        _finish(g, hidden, lm_head_kn, quant, shared)


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


def _finish(g: Graph, hidden: str, lm_head_kn: np.ndarray, quant: Quant, shared: dict) -> None:
    """Last position only: post-norm hidden state and logits."""
    last = g.op1("Gather", [hidden, g.const("idx_last", np.array(-1, np.int64))], axis=1)
    g.nodes.append(helper.make_node("Identity", [last], ["last_hidden_state"], name="last_hidden_state"))
    logits = _linear(g, last, lm_head_kn, "lm_head.weight.T", quant, shared)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))


class StandardDecoder:
    """Plain ONNX ops only (TensorRT): schema-2 cache (past in, whole cache out), rotary by position_ids."""

    def __init__(self, g: Graph, dims: ModelDims, eps: float, cos: np.ndarray, sin: np.ndarray) -> None:
        self.g, self.dims, self.eps = g, dims, eps
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        g.inputs += [
            _value("inputs_embeds", f32, ["batch", "sequence", dims.hidden_size]),
            _value("attention_mask", i64, ["batch", "total"]),
            _value("position_ids", i64, ["batch", "sequence"]),
        ]
        g.outputs += [
            _value("logits", f32, ["batch", dims.vocab_size]),
            _value("last_hidden_state", f32, ["batch", dims.hidden_size]),
        ]
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
        g.inputs += [_value(n, f32, ["batch", d.num_kv_heads, "past", d.head_dim]) for n in (pk, pv)]
        g.outputs += [_value(n, f32, ["batch", d.num_kv_heads, "total", d.head_dim]) for n in (nk, nv)]
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
        last = g.op1("Gather", [hidden, g.const("idx_last", np.array(-1, np.int64))], axis=1)
        g.nodes.append(helper.make_node("Identity", [last], ["last_hidden_state"], name="last_hidden_state"))
        logits = g.op1("MatMul", [last, g.shared(shared["lm_head.weight.T"])])
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))


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
    if precision not in PRECISIONS:
        raise ExportError(f"unknown decoder precision {precision!r} (choose from {', '.join(PRECISIONS)})")
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
        builders: list = [FusedDecoder(fused_g, dims, eps, cos, sin)]
        std_g = None
        if standard:
            std_g = Graph("m3d_decoder_standard", store)
            builders.append(StandardDecoder(std_g, dims, eps, cos, sin))
        shared: dict[str, TensorProto] = {}
        for i in range(n_layers):
            w = read_layer(src, cfg.family, i)
            for b in builders:
                b.layer(i, w, quant, shared)
            del w
            shared = {k: v for k, v in shared.items()}  # references only; the arrays are on disk
            gc.collect()
            if progress:
                progress(i + 1, n_layers)
        norm = src.get("model.norm.weight")
        head_name = "lm_head.weight" if "lm_head.weight" in src else "model.embed_tokens.weight"
        head = np.ascontiguousarray(src.get(head_name).T)
        for b in builders:
            b.finish(norm, head, quant, shared)
        del head
        store.close()
        # onnx's checker does not know onnxruntime's SimplifiedLayerNormalization (default domain); the
        # exporter validates the fused graph by running it instead
        _save(fused_g.model(), out / fused_name, check=False)
        if std_g is not None:
            _save(std_g.model(), out / standard_name, check=True)
    return DecoderFiles(
        fused=fused_name,
        standard=standard_name if standard else None,
        data=[data.name],
        settings=quant.settings(),
    )


def _save(model: onnx.ModelProto, path: Path, check: bool) -> None:
    """Write the proto (nodes + external references only); ``check`` runs onnx's checker on the file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    if check:
        onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)
