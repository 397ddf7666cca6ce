"""TensorRT engine folders without TensorRT or CUDA: optimization profiles, folder names, cache keys, KV
buffer sizes and ``engine.json`` (layout in :mod:`m3d_edge.runtime.trt_backend`); unit-tested on CPU."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from m3d_edge.bundle import GraphSpec, ModelDims
from m3d_edge.errors import BackendError

ENGINES_DIR = "engines"
ENGINE_JSON = "engine.json"
TIMING_CACHE = "timing.cache"
ENGINE_SCHEMA = 1
PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = "pip install m3d-edge[gpu]"
# the decoder gets two optimization profiles; every other graph one
DECODER_PROFILES = ("prefill", "decode")
DEFAULT_PROFILES = ("default",)

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
# (9, 0), [9, 0], "9.0", 9.0 or "sm90": what CUDA, engine.json and users give
ComputeCapability = tuple[int, int] | list[int] | str | float


def profile_names(graph: str) -> tuple[str, ...]:
    return DECODER_PROFILES if graph == "decoder" else DEFAULT_PROFILES


def axis_ranges(
    graph: str, dims: ModelDims, max_batch: int = 1, max_seq: int | None = None, context: int | None = None
) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of every named dynamic axis of ``graph``, per optimization profile.

    Decoder: ``prefill`` takes 1..max_seq new tokens after 0..context-1 cached ones (a follow-up question
    prefills its new suffix after the cached prefix), ``decode`` one token after up to context-1; ``past``
    is the third axis of the head-major past keys/values ``[batch, kv_heads, past, head_dim]``; ``total``
    (the attention mask, and the full-cache ``present`` outputs, whose shapes TensorRT infers) is
    past + new, 1..context. Encoders: only ``batch`` is dynamic.
    """
    context = int(context or dims.context_length)
    max_seq = int(max_seq or context)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
    if not 1 <= max_seq <= context:
        raise ValueError(f"max_seq must be in 1..{context} (the context length), got {max_seq}")
    batch = (1, 1, max_batch)
    if graph != "decoder":
        return {"default": {"batch": batch}}
    opt_seq = min(max_seq, dims.num_image_tokens + 32)  # a typical prompt: BOS + image tokens + question
    opt_past = min(context - 1, opt_seq + 64)  # the middle of a typical answer
    return {
        "prefill": {
            "batch": batch,
            "sequence": (1, opt_seq, max_seq),
            "past": (0, 0, context - 1),
            "total": (1, opt_seq, context),
        },
        "decode": {
            "batch": batch,
            "sequence": (1, 1, 1),
            "past": (0, opt_past, context - 1),
            "total": (1, opt_past + 1, context),
        },
    }


def profile_shapes(
    spec: GraphSpec,
    dims: ModelDims,
    max_batch: int = 1,
    max_seq: int | None = None,
    context: int | None = None,
) -> dict[str, list[ShapeRange]]:
    """Input name -> one (min, opt, max) shape per optimization profile, derived from the graph declaration.

    Profiles are in :func:`profile_names` order; a fixed axis is the same in all three shapes.
    """
    ranges = axis_ranges(spec.name, dims, max_batch, max_seq, context)
    out: dict[str, list[ShapeRange]] = {}
    for t in spec.inputs:
        per_profile: list[ShapeRange] = []
        for axes in ranges.values():
            unknown = [d for d in t.shape if isinstance(d, str) and d not in axes]
            if unknown:
                raise ValueError(f"{spec.name}.{t.name}: no range for dynamic axis {unknown[0]!r}")
            shape = [(d, d, d) if isinstance(d, int) else axes[d] for d in t.shape]
            lo, opt, hi = (tuple(s[k] for s in shape) for k in range(3))
            per_profile.append((lo, opt, hi))
        out[t.name] = per_profile
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def format_cc(cc: ComputeCapability | None) -> str:
    """Compute capability as "major.minor" from (9, 0), "9.0", 9.0 or "sm90"."""
    if isinstance(cc, tuple | list):
        return f"{int(cc[0])}.{int(cc[1])}"
    s = str(cc).lower().removeprefix("sm_").removeprefix("sm")
    if "." in s:
        major, minor = s.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    if s.isdigit() and len(s) >= 2:
        return f"{int(s[:-1])}.{int(s[-1])}"
    raise ValueError(f"not a compute capability: {cc!r}")


def engine_dir_name(gpu: str, cc: ComputeCapability, trt_version: str, precision: str) -> str:
    """``<gpu-slug>-sm<cc>-trt<version>-<precision>``, e.g. ``nvidia-h200-sm90-trt10.13.3-fp16``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown engine precision {precision!r} ({', '.join(PRECISIONS)})")
    return f"{slug(gpu)}-sm{format_cc(cc).replace('.', '')}-trt{trt_version}-{precision}"


def engine_cache_key(
    source_sha256: dict[str, str],
    gpu: str,
    cc: ComputeCapability,
    trt_version: str,
    precision: str,
    profiles: dict[str, Any],
    options: dict[str, Any] | None = None,
) -> str:
    """A short hash of everything a plan depends on; a plan whose key matches need not be rebuilt."""
    blob = json.dumps(
        {
            "source": dict(sorted(source_sha256.items())),
            "gpu": gpu,
            "cc": format_cc(cc),
            "trt": trt_version,
            "precision": precision,
            "profiles": profiles,
            "options": options or {},
        },
        sort_keys=True,
        default=list,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def kv_cache_bytes(dims: ModelDims, max_len: int, dtype: DTypeLike = "float32", batch: int = 1) -> int:
    """Bytes of :class:`TrtKVCache`: two ping-pong buffers (front, back) of keys + values of every layer,
    each ``[batch, kv_heads, max_len, head_dim]`` (the standard-op decoder returns the whole cache; the
    host :class:`~m3d_edge.runtime.generate.KVCache` of the fused graph needs half: one shared buffer)."""
    item = np.dtype(dtype).itemsize
    return 2 * 2 * dims.num_layers * max_len * batch * dims.num_kv_heads * dims.head_dim * item


def profiles_json(
    spec: GraphSpec, dims: ModelDims, max_batch: int, max_seq: int | None, context: int | None
) -> dict[str, dict[str, list[list[int]]]]:
    """The profiles of one graph as ``engine.json`` stores them: ``{profile: {input: [min, opt, max]}}``."""
    shapes = profile_shapes(spec, dims, max_batch, max_seq, context)
    return {
        p: {name: [list(s) for s in ranges[i]] for name, ranges in shapes.items()}
        for i, p in enumerate(profile_names(spec.name))
    }


def check_engine_compatible(
    engine_json: dict[str, Any], gpu: str, cc: ComputeCapability, trt_version: str
) -> None:
    """Refuse (BackendError, one line) a plan built for another GPU or another TensorRT version."""
    where = engine_json.get("path", "engine")
    built_gpu, built_trt = engine_json.get("gpu"), engine_json.get("trt_version")
    try:
        built_cc = format_cc(engine_json.get("compute_capability"))
    except ValueError:
        built_cc = str(engine_json.get("compute_capability"))
    here_cc = format_cc(cc)
    fix = "rebuild them here with `m3d-edge build-engines BUNDLE`"
    if built_gpu != gpu or built_cc != here_cc:
        raise BackendError(
            f"{where}: TensorRT engines were built for {built_gpu} (sm{built_cc.replace('.', '')}) but this "
            f"machine has {gpu} (sm{here_cc.replace('.', '')}); {fix}"
        )
    if built_trt != trt_version:
        raise BackendError(
            f"{where}: TensorRT engines were built with TensorRT {built_trt} but this machine has TensorRT "
            f"{trt_version}; {fix}"
        )


def read_engine_json(engine_dir: Path | str) -> dict[str, Any]:
    path = Path(engine_dir) / ENGINE_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BackendError(f"{path}: no engine description (build the engines first)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise BackendError(f"{path}: unreadable engine description ({e})") from e
    if not isinstance(data, dict) or data.get("schema") != ENGINE_SCHEMA:
        raise BackendError(f"{path}: engine description of an unknown schema (expects {ENGINE_SCHEMA})")
    data["path"] = str(path)
    return data


def write_engine_json(engine_dir: Path | str, data: dict[str, Any]) -> Path:
    from m3d_edge.fileio import atomic_write_text

    path = Path(engine_dir) / ENGINE_JSON
    clean = {k: v for k, v in data.items() if k != "path"}
    atomic_write_text(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return path


def find_engines(
    bundle: Path | str, precision: str, gpu: str, cc: ComputeCapability, trt_version: str
) -> Path:
    """The engine folder of ``bundle`` for this GPU, TensorRT version and precision, checked compatible."""
    root = Path(bundle) / ENGINES_DIR
    want = root / engine_dir_name(gpu, cc, trt_version, precision)
    if want.is_dir():
        check_engine_compatible(read_engine_json(want), gpu, cc, trt_version)
        return want
    others = sorted(p.name for p in root.glob(f"*-{precision}") if (p / ENGINE_JSON).is_file())
    if others:  # say why the ones that exist do not fit
        check_engine_compatible(read_engine_json(root / others[0]), gpu, cc, trt_version)
    raise BackendError(
        f"{bundle}: no {precision} TensorRT engines for {gpu} with TensorRT {trt_version} "
        f"(looked for {want}); build them with `m3d-edge build-engines {bundle}`"
    )


def trt_major(version: str) -> int:
    return int(str(version).split(".", 1)[0])
