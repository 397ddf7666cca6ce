"""ONNX graphs assembled node by node, their weights appended to one external-data file at page-aligned
offsets (the proto itself holds only nodes and external references: kilobytes), then saved."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17  # every graph of a bundle, traced or written here
MS_OPSET = 1
IR_VERSION = 10  # Jetson and other older onnxruntime builds reject newer IR
ALIGN = 4096  # page-aligned external data lets onnxruntime map it instead of reading it


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


def value_info(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def save_model(model: onnx.ModelProto, path: Path, check: bool) -> None:
    """Write the proto (nodes + external references only); ``check`` runs onnx's checker on the file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    if check:
        onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)
