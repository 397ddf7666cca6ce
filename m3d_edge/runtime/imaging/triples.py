"""Per-axis ``(z, y, x)`` triples as the imaging dataclasses declare them (``tuple[int, int, int]``, ...).

Each helper is exactly ``tuple(f(v) for v in values)``, typed as three values: the length is not checked,
so values from a 3D shape or a record written by ``to_dict`` keep today's behaviour, and a wrong-sized
input fails where it always did (e.g. :func:`~.preprocess.preprocess` refuses a 2D volume itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import SupportsFloat, SupportsInt, cast

Int3 = tuple[int, int, int]
Float3 = tuple[float, float, float]
Bool3 = tuple[bool, bool, bool]


def int3(values: Iterable[SupportsInt]) -> Int3:
    """``tuple(int(v) for v in values)`` as an :data:`Int3`."""
    return cast(Int3, tuple(int(v) for v in values))


def float3(values: Iterable[SupportsFloat]) -> Float3:
    """``tuple(float(v) for v in values)`` as a :data:`Float3`."""
    return cast(Float3, tuple(float(v) for v in values))


def bool3(values: Iterable[object]) -> Bool3:
    """``tuple(bool(v) for v in values)`` as a :data:`Bool3`."""
    return cast(Bool3, tuple(bool(v) for v in values))
