"""The external-data files an ONNX model names, read from the protobuf without the ``onnx`` package.

The runtime must open only files the manifest hashed; an ``.onnx`` file can point ONNX Runtime at more
files (``TensorProto.external_data`` entries with key ``location``). :func:`external_data_locations`
walks the wire format (initializers, sparse initializers, tensors in node attributes, subgraphs and
functions) and returns every location, so the bundle check can require each one to be hashed too.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from m3d_edge.errors import BundleError

_LEN = 2
# field numbers (onnx.proto3): which length-delimited fields hold what
_MODEL = {7: "graph", 20: "training", 25: "function"}
_TRAINING = {1: "graph", 2: "graph"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse"}
_FUNCTION = {7: "node"}
_NODE = {5: "attribute"}
_ATTRIBUTE = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_KINDS = {
    "model": _MODEL,
    "graph": _GRAPH,
    "training": _TRAINING,
    "function": _FUNCTION,
    "node": _NODE,
    "attribute": _ATTRIBUTE,
    "sparse": _SPARSE,
}
_MAX_DEPTH = 64


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos, end)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 5:
            nxt = pos + 4
        elif wire == _LEN:
            n, pos = _varint(buf, pos, end)
            nxt = pos + n
        else:
            raise _Malformed
        if nxt > end or field == 0:
            raise _Malformed
        yield field, wire, pos, nxt
        pos = nxt


def _entry(buf: memoryview, start: int, end: int) -> tuple[str, str]:
    key = value = ""
    for field, wire, a, b in _fields(buf, start, end):
        if wire == _LEN and field in (1, 2):
            text = bytes(buf[a:b]).decode("utf-8", "replace")
            key, value = (text, value) if field == 1 else (key, text)
    return key, value


def _walk(buf: memoryview, start: int, end: int, kind: str, depth: int, out: set[str]) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed
    if kind == "tensor":
        for field, wire, a, b in _fields(buf, start, end):
            if field == 13 and wire == _LEN:
                key, value = _entry(buf, a, b)
                if key == "location":
                    out.add(value)
        return
    table = _KINDS[kind]
    for field, wire, a, b in _fields(buf, start, end):
        sub = table.get(field)
        if sub is not None and wire == _LEN:
            _walk(buf, a, b, sub, depth + 1, out)


def external_data_locations(path: Path | str) -> set[str]:
    """Every external-data ``location`` named in the ONNX model at ``path`` (relative to its folder)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise BundleError(f"{path.name}: empty ONNX file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                buf = memoryview(mm)
                try:
                    out: set[str] = set()
                    _walk(buf, 0, len(buf), "model", 0, out)
                    return out
                finally:
                    buf.release()
    except _Malformed:
        raise BundleError(f"{path.name}: not a valid ONNX model (malformed protobuf)") from None
    except OSError as e:
        raise BundleError(f"{path.name}: unreadable ({e.strerror or type(e).__name__})") from None
