"""Accuracy and speed of a quantized graph against FP32, on held-out volumes, through the real runtime.

The FP32 reference is computed once (:class:`Reference`): image embeddings, SegVol embeddings, greedy
64-token generations on a task prompt suite, and masks from segment prompts with ``[SEG]`` forced by a
logit bias (a random-weight model rarely emits it on its own). Each variant is then run through
:class:`~m3d_edge.runtime.pipeline.Pipeline` with only its own graph switched, so a report measures that
graph's effect on what the user sees. Graphs that the variant does not change are not recomputed: the
reference embeddings are handed to the pipeline's per-study state.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m3d_edge.bundle import Manifest
from m3d_edge.runtime.backend import BackendOptions
from m3d_edge.runtime.generate import SamplingParams
from m3d_edge.runtime.pipeline import Pipeline, StudyState
from m3d_edge.runtime.prompts import TASKS

# (task, target): the token-agreement suite, greedy, no bias
PROMPT_SUITE: tuple[tuple[str, str | None], ...] = (
    ("report", None),
    ("locate", "liver"),
    ("segment", "liver"),
    ("vqa", "Which organ shows an abnormality in this image?"),
)
# segment prompts for mask Dice ([SEG] forced with a logit bias)
SEG_SUITE: tuple[tuple[str, str], ...] = (("segment", "liver"), ("refer_segment", "The largest organ."))
NEW_TOKENS = 64
SEG_TOKENS = 4


# -- metrics --------------------------------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def token_agreement(ref: list[int], test: list[int]) -> tuple[int, int, int]:
    """(common prefix length, position-wise matches, positions) of two generations; positions = longer length."""
    n = max(len(ref), len(test))
    prefix = 0
    while prefix < min(len(ref), len(test)) and ref[prefix] == test[prefix]:
        prefix += 1
    matches = sum(1 for a, b in zip(ref, test, strict=False) if a == b)
    return prefix, matches, n


def dice(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Dice of two boolean masks; two empty (or absent) masks agree perfectly."""
    a = np.zeros(0, bool) if a is None else np.asarray(a, bool).ravel()
    b = np.zeros(0, bool) if b is None else np.asarray(b, bool).ravel()
    sa, sb = int(a.sum()), int(b.sum())
    if sa == 0 and sb == 0:
        return 1.0
    if a.size != b.size:
        return 0.0
    return float(2.0 * np.logical_and(a, b).sum() / (sa + sb))


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


# -- running the pipeline ---------------------------------------------------------------------------
@dataclass
class Outputs:
    """What one configuration produced on the held-out volumes."""

    image_embeds: list[np.ndarray] = field(default_factory=list)
    seg_embeddings: list[np.ndarray] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # volume-major over PROMPT_SUITE
    masks: list[np.ndarray | None] = field(default_factory=list)  # volume-major over SEG_SUITE
    prefill: list[float] = field(default_factory=list)  # first question of each volume
    forced: list[tuple[int, int]] = field(default_factory=list)  # (teacher-forced top-1 matches, positions)
    steps: list[float] = field(default_factory=list)  # every decode step


def _seed(pipe: Pipeline, volume: np.ndarray, image_embeds: np.ndarray, seg: np.ndarray | None) -> None:
    """Hand known embeddings to the pipeline's per-study state, so it does not recompute them."""
    try:
        from m3d_edge.runtime.pipeline import _study_key

        key = _study_key(volume)
    except ImportError:  # older pipeline: the same rule
        key = f"array:{id(volume)}"
    pipe.state = StudyState(
        key, np.ascontiguousarray(volume.reshape(1, 1, *pipe.dims.image_size)), image_embeds
    )
    pipe.state.timings["vision"] = 0.0
    if seg is not None:
        pipe.state.seg_embedding = seg
        pipe.state.timings["seg_encoder"] = 0.0


def teacher_forced(pipe: Pipeline, image_embeds: np.ndarray, task: str, question: str, ref: list[int]):
    """(matches, positions): the model's greedy choice at each position of the reference continuation.

    Unlike free-running agreement this does not collapse after the first divergence: every position is
    scored on the reference prefix, which measures the quantization error itself on chaotic (random) models.
    """
    if not ref:
        return 0, 0
    ids = pipe.prompt_ids(question, TASKS[task].space)
    cache = pipe.decoder.new_cache(len(ids) + len(ref) + 1)
    pipe.decoder.step(cache, pipe.embed(ids, image_embeds), ids)
    matches = int(np.argmax(pipe.decoder.logits[0]) == ref[0])
    for k in range(len(ref) - 1):
        pipe.decoder.step_token(cache, ref[k])
        matches += int(np.argmax(pipe.decoder.logits[0]) == ref[k + 1])
    return matches, len(ref)


def run_pipeline(
    pipe: Pipeline,
    volumes: list[np.ndarray],
    *,
    generate: bool = True,
    segment: bool = True,
    seed_from: Outputs | None = None,
    seed_vision: bool = False,
    seed_seg: bool = False,
    new_tokens: int = NEW_TOKENS,
    teacher: list[list[int]] | None = None,
) -> Outputs:
    out = Outputs()
    seg_params = SamplingParams(logit_bias=pipe.seg_bias())
    for i, volume in enumerate(volumes):
        if seed_from is not None and (seed_vision or seed_seg):
            _seed(
                pipe,
                volume,
                seed_from.image_embeds[i] if seed_vision else pipe.prepare(volume).image_embeds,
                seed_from.seg_embeddings[i] if seed_seg else None,
            )
        state = pipe.prepare(volume)
        out.image_embeds.append(state.image_embeds)
        first = True
        if generate:
            for task, target in PROMPT_SUITE:
                r = pipe.ask(volume, task=task, target=target, max_new_tokens=new_tokens)
                out.tokens.append(list(r.tokens))
                if teacher is not None:
                    ref = teacher[len(out.tokens) - 1]
                    out.forced.append(teacher_forced(pipe, state.image_embeds, task, r.question, ref))
                if first:
                    out.prefill.append(r.timings["prefill"])
                    first = False
                out.steps.extend(r.timings["decode_steps"])
        if segment:
            for task, target in SEG_SUITE:
                r = pipe.ask(volume, task=task, target=target, max_new_tokens=SEG_TOKENS, sampling=seg_params)
                out.masks.append(r.mask)
        out.seg_embeddings.append(pipe.seg_embedding(state))
    return out


def time_graph(sessions: list[Any], inputs: dict[str, np.ndarray], runs: int = 3) -> list[list[float]]:
    """Latencies of several sessions on the same inputs: one warm-up each, then ``runs`` interleaved rounds."""
    for s in sessions:
        s.run(inputs)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(inputs)
            times[k].append(time.perf_counter() - t0)
    return times


def time_decode(
    pipes: list[Pipeline], volume, image_embeds, runs: int = 3, tokens: int = 16
) -> dict[str, Any]:
    """Prefill and decode-step latency of [FP32, quantized] pipelines, interleaved so machine load hits both."""
    prefill: list[list[float]] = [[] for _ in pipes]
    steps: list[list[float]] = [[] for _ in pipes]
    for k in range(runs + 1):
        for i, pipe in enumerate(pipes):
            _seed(pipe, volume, image_embeds, None)  # fresh state: empty KV cache, no vision run
            res = pipe.ask(volume, task="report", max_new_tokens=tokens)
            if k:  # the first round warms up
                prefill[i].append(res.timings["prefill"])
                steps[i].append(_median(res.timings["decode_steps"]) or float("nan"))
    q, ref = _median(steps[1]), _median(steps[0])
    return {
        "decode_step_s": q,
        "decode_step_s_fp32": ref,
        "decode_tokens_per_s": 1.0 / q if q else None,
        "decode_tokens_per_s_fp32": 1.0 / ref if ref else None,
        "decode_speedup": ref / q if q and ref else None,
        "prefill_s": _median(prefill[1]),
        "prefill_s_fp32": _median(prefill[0]),
        "runs": runs,
    }


class Reference:
    """The FP32 pipeline and its outputs on the held-out volumes."""

    def __init__(
        self, bundle, manifest: Manifest, volumes: list[np.ndarray], options: BackendOptions
    ) -> None:
        fp32 = {name: entry.precision for name, entry in manifest.graphs.items()}
        self.pipe = Pipeline(bundle, manifest, options, precision=fp32)
        self.volumes = volumes
        self.outputs = run_pipeline(self.pipe, volumes)


def evaluate_variant(
    bundle,
    manifest: Manifest,
    graph: str,
    precision: str,
    ref: Reference,
    options: BackendOptions,
    speed_runs: int = 3,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, speed) of ``graph`` at ``precision`` (every other graph FP32) against the reference."""
    want = {name: entry.precision for name, entry in manifest.graphs.items()}
    want[graph] = precision
    pipe = Pipeline(bundle, manifest, options, precision=want)
    vols, r = ref.volumes, ref.outputs
    metrics: dict[str, Any] = {"held_out_volumes": len(vols)}
    speed: dict[str, Any] = {}
    if graph in ("vision", "seg_encoder"):
        t_ref, t_q = time_graph(
            [ref.pipe.sessions[graph], pipe.sessions[graph]], {"image": vols[0]}, speed_runs
        )
        speed.update(_speed(t_ref, t_q, "latency_s"))
    generate = graph in ("vision", "decoder")
    out = run_pipeline(
        pipe,
        vols,
        generate=generate,
        segment=True,
        seed_from=r,
        seed_vision=graph != "vision",
        seed_seg=graph != "seg_encoder",
        teacher=r.tokens if graph in ("vision", "decoder") else None,
    )
    if graph in ("vision", "seg_encoder"):
        pairs = zip(r.image_embeds, out.image_embeds, strict=True)
        if graph == "seg_encoder":
            pairs = zip(r.seg_embeddings, out.seg_embeddings, strict=True)
        cos = [cosine(a, b) for a, b in pairs]
        metrics["embedding_cosine"] = min(cos)
        metrics["embedding_cosine_mean"] = float(np.mean(cos))
    if generate:
        prefix = matches = total = 0
        exact = 0
        for a, b in zip(r.tokens, out.tokens, strict=True):
            p, m, n = token_agreement(a, b)
            prefix, matches, total, exact = prefix + p, matches + m, total + n, exact + (a == b)
        metrics["token_agreement"] = matches / total if total else 1.0
        metrics["prefix_agreement"] = prefix / total if total else 1.0
        metrics["generations_identical"] = f"{exact}/{len(r.tokens)}"
        forced_n = sum(n for _, n in out.forced)
        metrics["teacher_forced_agreement"] = sum(m for m, _ in out.forced) / forced_n if forced_n else None
        metrics["tokens_compared"] = total
    dices = [dice(a, b) for a, b in zip(r.masks, out.masks, strict=True)]
    metrics["mask_dice"] = min(dices) if dices else None
    metrics["mask_dice_mean"] = float(np.mean(dices)) if dices else None
    metrics["masks_nonempty_fp32"] = f"{sum(1 for m in r.masks if m is not None and m.any())}/{len(r.masks)}"
    if graph == "decoder":
        speed.update(time_decode([ref.pipe, pipe], vols[0], r.image_embeds[0], speed_runs))
        speed["suite_decode_step_s"] = _median(out.steps)
        speed["suite_decode_step_s_fp32"] = _median(r.steps)
        speed["note"] = (
            "decode/prefill: interleaved FP32 and quantized runs (report prompt, 16 new tokens, fresh KV cache);"
            " suite_*: medians over every step of the accuracy suite (FP32 measured earlier, less comparable)"
        )
    speed["providers"] = [pipe.sessions[graph].provider]
    return metrics, speed


def _speed(t_ref: list[float], t_q: list[float], key: str) -> dict[str, Any]:
    ref, q = _median(t_ref), _median(t_q)
    return {
        key: q,
        f"{key}_fp32": ref,
        "speedup": (ref / q) if ref and q else None,
        "runs": len(t_q),
        "spread_s": [min(t_q), max(t_q)],
        "spread_s_fp32": [min(t_ref), max(t_ref)],
    }
