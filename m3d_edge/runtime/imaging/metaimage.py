"""MetaImage volumes (``.mha``, ``.mhd`` + raw file): a small header parser, no ITK.

No small, maintained pure-Python MetaImage reader exists (SimpleITK and ITK are 50-100 MB wheels for a
text header and a raw or zlib block), so the format is read here: ``Key = Value`` lines up to
``ElementDataFile``, scalar 3D images of the MET_* integer and float types, raw or zlib-compressed
(``CompressedData = True``), data in the same file (``LOCAL``) or a file in the header's folder.
Geometry follows ITK's MetaImageIO: row ``i`` of ``TransformMatrix`` is the direction of voxel axis ``i``,
``Offset`` the position of the first voxel, in LPS millimetres. Sizes are checked against the voxel
limit and compressed data is inflated to at most the declared size.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from m3d_edge.errors import StudyError
from m3d_edge.runtime.imaging.geometry import Geometry
from m3d_edge.runtime.imaging.limits import bounded_inflate, check_voxels
from m3d_edge.runtime.imaging.study import Study

_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
_MAX_HEADER = 1 << 16


def read_header(path: Path) -> tuple[dict[str, str], int]:
    """The header fields and the byte offset just after the ``ElementDataFile`` line."""
    with open(path, "rb") as fh:
        head = fh.read(_MAX_HEADER)
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        if end < 0:
            break
        line = head[pos:end].decode("latin-1").strip()
        pos = end + 1
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise StudyError(f"{path}: not a MetaImage header (line {line[:40]!r})")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, pos
    raise StudyError(f"{path}: MetaImage header without ElementDataFile in its first 64 KB")


def _floats(
    path: Path, fields: dict[str, str], keys: tuple[str, ...], n: int, default: list[float]
) -> list[float]:
    for k in keys:
        if k in fields:
            try:
                v = [float(x) for x in fields[k].split()]
            except ValueError:
                raise StudyError(f"{path}: MetaImage {k} {fields[k]!r} is not numbers") from None
            if len(v) != n:
                raise StudyError(f"{path}: MetaImage {k} has {len(v)} values, expected {n}")
            return v
    return default


def load_metaimage(path: Path | str, max_voxels: int | None = None) -> Study:
    """MetaImage -> :class:`Study` (z, y, x) in LPS."""
    path = Path(path)
    fields, offset = read_header(path)
    if fields.get("ObjectType", "Image").lower() != "image":
        raise StudyError(f"{path}: MetaImage ObjectType {fields['ObjectType']!r} is not an image")
    if int(fields.get("ElementNumberOfChannels", "1") or 1) != 1:
        raise StudyError(f"{path}: MetaImage with several channels per voxel is not a CT volume")
    dims = [int(float(x)) for x in fields.get("DimSize", "").split()]
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) != 3 or int(fields.get("NDims", "3")) < 3:
        raise StudyError(f"{path}: MetaImage of DimSize {fields.get('DimSize')!r}; expected a 3D volume")
    etype = fields.get("ElementType", "")
    if etype not in _TYPES:
        raise StudyError(f"{path}: MetaImage ElementType {etype!r} is not supported")
    msb = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False")).lower() == "true"
    dtype = np.dtype(_TYPES[etype]).newbyteorder(">" if msb else "<")
    n = check_voxels(dims, str(path), max_voxels)
    need = n * dtype.itemsize

    source = fields["ElementDataFile"]
    if source.upper() == "LOCAL":
        data_path = path
    else:
        data_path = (path.parent / source).resolve()
        if " " in source or not data_path.is_relative_to(path.parent.resolve()) or not data_path.is_file():
            raise StudyError(f"{path}: ElementDataFile {source!r} is not one file in the header's folder")
        offset = int(fields.get("HeaderSize", "0") or 0)
        if offset < 0:  # -1: the data is the end of the file
            offset = max(0, data_path.stat().st_size - need)
    with open(data_path, "rb") as fh:
        fh.seek(offset)
        if fields.get("CompressedData", "False").lower() == "true":
            raw = bounded_inflate(fh, need, str(path), wbits=32 + zlib.MAX_WBITS)  # zlib or gzip header
        else:
            raw = fh.read(need)
    if len(raw) != need:
        raise StudyError(
            f"{path}: truncated MetaImage: DimSize declares {need:,} bytes, the data holds {len(raw):,}"
        )
    data = np.frombuffer(raw, dtype=dtype).reshape(dims[::-1])  # x varies fastest: (z, y, x)

    spacing = _floats(path, fields, ("ElementSpacing", "ElementSize"), 3, [1.0, 1.0, 1.0])
    origin = _floats(path, fields, ("Offset", "Origin", "Position"), 3, [0.0, 0.0, 0.0])
    matrix = _floats(
        path, fields, ("TransformMatrix", "Rotation", "Orientation"), 9, [1, 0, 0, 0, 1, 0, 0, 0, 1]
    )
    affine = np.eye(4)
    for i in range(3):
        affine[:3, i] = np.asarray(matrix[3 * i : 3 * i + 3]) * spacing[i]
    affine[:3, 3] = origin
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise StudyError(f"{path}: MetaImage geometry is singular or not finite")
    hu = np.ascontiguousarray(data, dtype=np.float32)
    if not np.isfinite(hu).all():
        raise StudyError(f"{path}: MetaImage contains NaN or infinite values")
    return Study(hu=hu, geometry=Geometry.from_affine(affine, hu.shape), kind="metaimage", source_path=path)
