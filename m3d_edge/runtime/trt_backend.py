"""Native TensorRT backend (docs/architecture.md §6): plans built by :mod:`m3d_edge.export.engines`, run with
``tensorrt`` + ``cuda-python`` and no torch.

Layout of the engine cache inside a bundle::

    engines/timing.cache                                  shared builder timing cache
    engines/<gpu-slug>-sm<cc>-trt<version>-<precision>/   one folder per GPU x TensorRT x precision
        engine.json                                       what was built, for what, from which graph
        vision.plan  decoder.plan  seg_encoder.plan  seg_decoder.plan

A plan only runs on the GPU model and the exact TensorRT version it was built with (TensorRT's default;
version- and hardware-compatible plans are slower and not used here), so ``engine.json`` records both and
:func:`check_engine_compatible` refuses a mismatch before TensorRT is asked to deserialize anything.

This module is the backend's front door (:func:`open_engines`, and every name below re-exported); the parts
live beside it: :mod:`~m3d_edge.runtime.trt_metadata` (profile shapes, folder names, cache keys, buffer
sizes, ``engine.json``: neither TensorRT nor CUDA, unit-tested on CPU), :mod:`~m3d_edge.runtime.trt_device`
(the lazy ``tensorrt``/``cuda`` imports, CUDA calls, plan loading), :mod:`~m3d_edge.runtime.trt_sessions`
(encoder graphs) and :mod:`~m3d_edge.runtime.trt_decoder` (decoder and KV cache). ``tensorrt`` and ``cuda``
are imported only when a class is built, so every one of them imports everywhere.

Decoder on the device: TensorRT builds from the bundle's standard-op decoder (``decoder_std``, schema-2
contract); :class:`TrtKVCache` implements :class:`m3d_edge.runtime.protocols.Cache` with a ping-pong
layout in device memory: per layer and per K/V two flat buffers (front, back) of
``kv_heads * max_len * head_dim`` elements. A step binds the past as the head of the front buffer viewed as
``[1, kv_heads, past, head_dim]`` (the bundle's head-major layout, contiguous for batch 1) and the present,
the whole cache after the step, to the head of the back buffer viewed as ``[1, kv_heads, past + n,
head_dim]``; then the two swap. The engine's Concat writes the new cache straight into the back buffer, so
no step copies or transposes anything itself and nothing of the cache crosses to the host; only
:meth:`TrtKVCache.truncate` (prefix reuse across questions) compacts each head's first positions into the
back buffer with one device-to-device 2D copy per buffer. Per step only the new token's embedding row goes up
and the ``[1, V]`` logits and ``[1, H]`` hidden state come back; the attention mask (all ones) and the
position ids (``arange``) live on the device once and each step binds a view of them. One CUDA stream, two
execution contexts (one per optimization profile: ``prefill`` for prompts, ``decode`` for single tokens),
each enqueued with ``execute_async_v3``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from m3d_edge.bundle import GraphSpec, ModelDims
from m3d_edge.runtime.trt_decoder import TrtDecoder, TrtKVCache
from m3d_edge.runtime.trt_device import (
    Cuda,
    TrtEngine,
    TrtLogger,
    device_identity,
    import_cudart,
    import_tensorrt,
)
from m3d_edge.runtime.trt_metadata import (
    DECODER_PROFILES,
    DEFAULT_PROFILES,
    ENGINE_JSON,
    ENGINE_SCHEMA,
    ENGINES_DIR,
    INSTALL_HINT,
    PRECISIONS,
    TIMING_CACHE,
    ComputeCapability,
    Shape,
    ShapeRange,
    axis_ranges,
    check_engine_compatible,
    engine_cache_key,
    engine_dir_name,
    find_engines,
    format_cc,
    kv_cache_bytes,
    profile_names,
    profile_shapes,
    profiles_json,
    read_engine_json,
    slug,
    trt_major,
    write_engine_json,
)
from m3d_edge.runtime.trt_sessions import TrtGraphSession

__all__ = [
    "DECODER_PROFILES",
    "DEFAULT_PROFILES",
    "ENGINES_DIR",
    "ENGINE_JSON",
    "ENGINE_SCHEMA",
    "INSTALL_HINT",
    "PRECISIONS",
    "TIMING_CACHE",
    "ComputeCapability",
    "Cuda",
    "Shape",
    "ShapeRange",
    "TrtDecoder",
    "TrtEngine",
    "TrtGraphSession",
    "TrtKVCache",
    "TrtLogger",
    "axis_ranges",
    "check_engine_compatible",
    "device_identity",
    "engine_cache_key",
    "engine_dir_name",
    "find_engines",
    "format_cc",
    "import_cudart",
    "import_tensorrt",
    "kv_cache_bytes",
    "open_engines",
    "profile_names",
    "profile_shapes",
    "profiles_json",
    "read_engine_json",
    "slug",
    "trt_major",
    "write_engine_json",
]


def open_engines(
    bundle: Path | str,
    precision: str,
    dims: ModelDims,
    specs: dict[str, GraphSpec],
    embed_table: np.ndarray,
    device: int = 0,
    graphs: Iterable[str] = ("vision", "seg_encoder", "seg_decoder"),
) -> tuple[dict[str, TrtGraphSession], TrtDecoder, Path]:
    """Sessions for the encoder graphs and the decoder of ``bundle``'s engines for this machine."""
    gpu, cc, version = device_identity(device)
    folder = find_engines(bundle, precision, gpu, cc, version)
    info = read_engine_json(folder)
    sessions = {g: TrtGraphSession(folder / f"{g}.plan", specs[g], info, device) for g in graphs}
    decoder = TrtDecoder(folder / "decoder.plan", specs["decoder"], dims, embed_table, info, device)
    return sessions, decoder, folder
