"""``m3d-edge bench``: per-graph latency percentiles, TTFT and decode speed of a bundle (docs/architecture.md §8).

The prompt follows the benchmark protocol: BOS + 256 image tokens + a caption question, greedy, a fixed
number of new tokens (eos ignored so every run decodes the same count), a CT-like volume (never noise).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.runtime.imaging.phantom import ct_like_volume

BENCH_QUESTION = "Can you provide a caption consists of findings for this medical image?"


def percentiles(xs: list[float]) -> dict[str, float | int]:
    """Count, p50/p90/p99, mean, min and max of timed samples (the bench tables and benchmarks/)."""
    a = np.asarray(xs, dtype=np.float64)
    return {
        "n": int(a.size),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def load_image(pipe, study: Path | None) -> np.ndarray:
    if study is None:
        return ct_like_volume()[None, None]
    state = pipe.prepare(study)
    return state.image


def bench_pipeline(pipe, image: np.ndarray, iters: int, warmup: int, max_new_tokens: int) -> dict[str, Any]:
    from m3d_edge.runtime.generate import generate

    sessions = pipe.sessions
    ids = pipe.prompt_ids(BENCH_QUESTION, space=False)
    cache = pipe.decoder.new_cache(len(ids) + max_new_tokens)
    rng = np.random.default_rng(0)
    seg_hidden = rng.standard_normal((1, pipe.dims.hidden_size)).astype(np.float32)
    samples: dict[str, list[float]] = {
        k: [] for k in ("vision", "seg_encoder", "seg_decoder", "prefill", "ttft", "decode_tokens_per_s")
    }
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        embeds_img = sessions["vision"].run({"image": image})["image_embeds"]
        t_vision = time.perf_counter() - t0
        embeds = pipe.embed(ids, embeds_img)
        cache.truncate(0)  # a full prefill every time
        gen = generate(
            pipe.decoder, cache, embeds, ids, max_new_tokens=max_new_tokens, eos_ids=set(), keep_hidden=False
        )
        t0 = time.perf_counter()
        emb = sessions["seg_encoder"].run({"image": image})["image_embedding"]
        t_seg_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        sessions["seg_decoder"].run({"image_embedding": emb, "seg_hidden": seg_hidden})
        t_seg_dec = time.perf_counter() - t0
        if i < warmup:
            continue
        samples["vision"].append(t_vision)
        samples["seg_encoder"].append(t_seg_enc)
        samples["seg_decoder"].append(t_seg_dec)
        samples["prefill"].append(gen.prefill_seconds)
        samples["ttft"].append(t_vision + gen.prefill_seconds)
        steps = sum(gen.step_seconds)
        samples["decode_tokens_per_s"].append(len(gen.step_seconds) / steps if steps > 0 else 0.0)
    prov = pipe.provenance()
    return {
        "bundle_id": pipe.manifest.bundle_id,
        "family": pipe.dims.family,
        "provider": sorted(set(prov["provider"].values())),
        "precision": prov["precision"],
        "threads": pipe.options.threads,
        "prompt_tokens": len(ids),
        "new_tokens": max_new_tokens,
        "iters": iters,
        "warmup": warmup,
        "stages": {k: percentiles(v) for k, v in samples.items()},
        "peak_rss_bytes": peak_rss_bytes(),
    }


def bench_reference(
    ckpt: Path, pipe, image: np.ndarray, iters: int, warmup: int, max_new_tokens: int, threads: int
) -> dict[str, Any]:
    """The torch reference on the same prompt and number of new tokens (HF generate, eager FP32)."""
    import torch

    from m3d_edge.export.reference import ReferenceModel

    if threads:
        torch.set_num_threads(threads)
    ref = ReferenceModel.from_checkpoint(ckpt)
    ids = pipe.prompt_ids(BENCH_QUESTION, space=False)
    input_ids = torch.tensor([ids], dtype=torch.long)
    img = torch.from_numpy(np.ascontiguousarray(image))
    eos = sorted(pipe.eos_ids)
    vision, ttft, tps = [], [], []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        ref.encode_images(img)
        t_vision = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref.generate(img, input_ids, max_new_tokens=1, eos_token_id=eos)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref.generate(
            img, input_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, eos_token_id=eos
        )
        t_all = time.perf_counter() - t0
        if i < warmup:
            continue
        vision.append(t_vision)
        ttft.append(t_first)
        decode = t_all - t_first
        tps.append((max_new_tokens - 1) / decode if decode > 0 else 0.0)
    return {
        "engine": "torch eager fp32 (transformers generate)",
        "torch_threads": torch.get_num_threads(),
        "stages": {
            "vision": percentiles(vision),
            "ttft": percentiles(ttft),
            "decode_tokens_per_s": percentiles(tps),
        },
        "peak_rss_bytes": peak_rss_bytes(),
    }


def reference_ratios(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Bundle against torch reference at p50 (``stages`` of each): > 1 means the bundle is faster."""
    return {
        "vision_speedup": ref["vision"]["p50"] / ours["vision"]["p50"],
        "ttft_speedup": ref["ttft"]["p50"] / ours["ttft"]["p50"],
        "decode_tokens_per_s_ratio": ours["decode_tokens_per_s"]["p50"]
        / max(ref["decode_tokens_per_s"]["p50"], 1e-12),
    }
