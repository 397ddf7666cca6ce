"""The quantizers: static symmetric INT8 QDQ for the encoders, weight-only MatMulNBits for the decoder.

Encoders (docs/architecture.md §6): ``quantize_static`` in QDQ format, S8S8 (activations and weights ``QInt8``), symmetric
activations and weights (every zero point is 0, what TensorRT consumes), per-channel weights (output channel
axis 1 of a MatMul's ``[K, N]`` weight), op types restricted to MatMul/Gemm: quantizing the inputs of Add,
Softmax or the normalizations destroys the ViT (PITFALLS); MatMul outputs stay float too, so the bias Add
and the attention scaling never read a quantized tensor. By default only the MatMuls with a constant weight
(the linear layers) are quantized: on the bench ViT-B, also quantizing the attention ``QK^T`` / ``PV``
products lowered the embedding cosine from 0.9997 to 0.9968 for 10 % more speed. (ORT's
``MatMulConstBOnly`` option is ignored by its QDQ quantizer, hence the explicit node list.)

Calibration runs one volume at a time (ORT's strided collection), so the histogram methods (entropy,
percentile) hold the intermediate tensors of one volume only; the ranges are saved as a JSON cache.

Decoder: ``MatMulNBits`` weight-only quantization, 8 or 4 bits, blocks of ``block_size`` along K, with
``accuracy_level=4`` (int8 activations inside the kernel: without it ORT has no fast CPU kernel). The
explicit algorithm config carries the same accuracy level, so the two cannot disagree.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from m3d_edge.choices import CALIBRATION_METHODS

ENCODER_OP_TYPES = ("MatMul", "Gemm")
EXTERNAL_DATA_LIMIT = 1_800_000_000  # bytes of initializers above which a graph is saved with external data


class _VolumeReader:
    """ORT ``CalibrationDataReader`` over model-input volumes; ``set_range`` lets ORT feed one at a time."""

    def __init__(self, input_name: str, volumes: list[np.ndarray]) -> None:
        self.input_name, self.volumes = input_name, volumes
        self.start, self.end = 0, len(volumes)
        self.pos = 0

    def __len__(self) -> int:
        return len(self.volumes)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, end_index, start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= min(self.end, len(self.volumes)):
            return None
        vol = self.volumes[self.pos]
        self.pos += 1
        return {self.input_name: np.ascontiguousarray(vol, dtype=np.float32)}

    def rewind(self) -> None:
        self.pos = self.start


def _calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in table:
        raise ValueError(
            f"unknown calibration method {method!r} (choose from {', '.join(CALIBRATION_METHODS)})"
        )
    return table[method]


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * max(1, onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return total


def save_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save a graph (external data beside it when large); returns every file written."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if _initializer_bytes(model) > EXTERNAL_DATA_LIMIT:
        onnx.save_model(
            model, str(path), save_as_external_data=True, location=data.name, all_tensors_to_one_file=True
        )
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


def encoder_extra_options() -> dict[str, Any]:
    return {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "DedicatedQDQPair": True,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        # keep MatMul outputs in float: else the bias Add, the attention scaling and the reshapes read
        # quantized tensors (the PITFALLS trap); ORT then fuses DQ->MatMul into MatMulIntegerToFloat
        "OpTypesToExcludeOutputQuantization": list(ENCODER_OP_TYPES),
        # collect one volume at a time (bounded memory, histograms merged across volumes). Not
        # CalibMaxIntermediateOutputs: ORT 1.32's MinMax calibrator clears those outputs before using them.
        "CalibStridedMinMax": 1,
    }


def u8s8_saturates(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU runs ONNX Runtime's INT8 MatMul with VPMADDUBSW, whose int16 sums saturate: x86
    with AVX2 but no VNNI. Onnxruntime's quantization guide prescribes reduce-range (7-bit weights) there;
    without it the tiny vision encoder's INT8 embedding fell to cosine 0.984 on an AVX2-only AMD EPYC
    (it passes the 0.995 gate with it). VNNI (AVX512-VNNI, AVX-VNNI, AMX) and ARM kernels do not saturate."""
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    except OSError:  # not Linux: assume a kernel that does not saturate
        return False
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def quantize_encoder(
    src: Path,
    dst: Path,
    volumes: list[np.ndarray],
    *,
    method: str = "minmax",
    input_name: str = "image",
    cache_path: Path | None = None,
    weights_only_matmuls: bool = True,
) -> dict[str, Any]:
    """Static S8S8 symmetric QDQ quantization of an encoder graph; returns the settings used.

    ``weights_only_matmuls`` quantizes only the MatMul/Gemm nodes with a constant weight (the linear
    layers); the attention products of two activations then stay FP32.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if not volumes:
        raise ValueError("no calibration volumes")
    settings = {
        "quantizer": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activation_type": "QInt8",
        "weight_type": "QInt8",
        "symmetric": True,
        "per_channel": True,
        "reduce_range": u8s8_saturates(),  # 7-bit weights where the CPU's INT8 kernels saturate
        "op_types": list(ENCODER_OP_TYPES),
        "outputs_quantized": False,
        "method": method,
        "samples": len(volumes),
    }
    nodes = None
    if weights_only_matmuls:
        graph = onnx.load(str(src), load_external_data=False).graph
        inits = {t.name for t in graph.initializer}
        nodes = [n.name for n in graph.node if n.op_type in ENCODER_OP_TYPES and n.input[1] in inits]
        if not nodes or any(not name for name in nodes):
            raise ValueError(f"{src}: no named constant-weight MatMul/Gemm nodes to quantize")
    settings["weights_only_matmuls"] = weights_only_matmuls
    settings["quantized_nodes"] = len(nodes) if nodes else None
    if cache_path is not None:
        Path(cache_path).unlink(missing_ok=True)  # always recalibrate on this data
    with tempfile.TemporaryDirectory(prefix="m3d-quant.") as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_static(
            str(src),
            str(out),
            _VolumeReader(input_name, volumes),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(ENCODER_OP_TYPES),
            nodes_to_quantize=nodes,
            per_channel=True,
            reduce_range=settings["reduce_range"],
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_calibration_method(method),
            extra_options=encoder_extra_options(),
            calibration_cache_path=str(cache_path) if cache_path is not None else None,
        )
        model = onnx.load(str(out))
    _keep_ir(model, src)
    save_model(model, dst)
    return settings


def _keep_ir(model: onnx.ModelProto, src: Path) -> None:
    """Keep the source graph's IR version (the bundle promises IR <= 10 for older runtimes)."""
    src_ir = onnx.load(str(src), load_external_data=False).ir_version
    if model.ir_version > src_ir:
        model.ir_version = src_ir


def quantize_decoder(
    src: Path,
    dst: Path,
    *,
    bits: int,
    block_size: int = 32,
    accuracy_level: int = 4,
    symmetric: bool | None = None,
) -> dict[str, Any]:
    """Weight-only ``MatMulNBits`` quantization of every constant-weight MatMul of the decoder."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if bits not in (4, 8):
        raise ValueError(f"weight-only decoder quantization supports 4 or 8 bits, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16 (got {block_size})")
    if symmetric is None:
        symmetric = bits == 8  # int4 keeps per-block zero points: noticeably closer to FP32 at 4 bits
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
        bits=bits,
    )
    model = onnx.load(str(src))
    quant = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",),
        algo_config=config,
    )
    quant.process()
    out = quant.model.model
    _keep_ir(out, src)
    save_model(out, dst)
    return {
        "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "op": "com.microsoft.MatMulNBits",
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "symmetric": symmetric,
    }


# -- inspection (tests, reports) ---------------------------------------------------------------------
def dequantize_zero_points(path: Path | str) -> list[tuple[str, np.ndarray]]:
    """(node name, zero point) of every DequantizeLinear of a graph; a missing zero point reads as int8 0."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    consts = {}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    out = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        if len(n.input) < 3 or not n.input[2]:
            out.append((n.name, np.zeros((), np.int8)))
            continue
        t = inits.get(n.input[2]) or consts.get(n.input[2])
        if t is None:
            raise ValueError(f"{path}: zero point {n.input[2]} of {n.name} is not a constant")
        out.append((n.name, numpy_helper.to_array(t)))
    return out


def op_counts(path: Path | str) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def matmulnbits_attributes(path: Path | str) -> list[dict[str, Any]]:
    """The attributes (bits, block_size, accuracy_level, K, N) of every MatMulNBits node."""
    model = onnx.load(str(path), load_external_data=False)
    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    ]


def io_names(path: Path | str) -> tuple[list[str], list[str]]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


def file_bytes(paths: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)
