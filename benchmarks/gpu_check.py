"""One-call GPU check of the TensorRT path: build engines, parity against ORT CPU FP32, latency table.

    python benchmarks/gpu_check.py [--work /tmp/m3d-gpu] [--bundle B] [--precisions fp32,fp16,int8]
                                   [--bandwidth-gbs 4800] [--new-tokens 64] [--runs 3] [--opt-level 2]

Sized for one device call of under 8 minutes on a fresh GPU machine (16 cores): it first checks that
``tensorrt``, ``cuda-python`` and a GPU are there and stops within seconds, saying what is missing, when they
are not. Then, unless ``--bundle`` is given, it makes the bench-size bundle on the machine itself (a 1.4 GB
bundle cannot travel: the carry limit is 64 MiB) from the tiny-checkpoint writer (``bench`` preset, docs/architecture.md
§8) and the exporter, plus symmetric INT8 QDQ variants of the two encoders for the int8 engines.

Gates (exit 1 when one fails): FP32 engines give the reference's greedy tokens exactly; FP16 and INT8
engines agree with them on >= 97% of steps when fed the reference tokens (teacher forced; the free-running
agreement is reported too: with the bench decoder's std-0.2 weights one flipped token changes every later
one); seg mask Dice >= 0.95 against ORT FP32 for the same seg prompt. The latency table gives time to first
token (vision + prefill), decode tokens/s and its share of the memory-bandwidth roofline (bytes a decode
step must move: the decoder plan, about its weights, plus the KV cache read as the past and written back
whole as the present into the other ping-pong buffer, i.e. ``kv_cache_bytes`` (both buffers) at the average
length; attention's own read of the present is not counted; bandwidth from ``--bandwidth-gbs``,
default the H200's 4.8 TB/s datasheet figure from the device notes; KINDS.md measured ~4.3 TB/s copies).
Results go to $OUT/gpu_check.json when OUT is set, else benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "What is the abnormality in the right lung and how large is it? Describe its location."
H200_GBS = 4800.0  # /work/.library/device/H200.md: 141 GB HBM3e at 4.8 TB/s (vendor datasheet)
NEEDS = (
    "needs: an NVIDIA GPU and driver; the TensorRT Python package 10.x or 11.x (`pip install m3d-edge[gpu]`, "
    "i.e. tensorrt-cu12/cu13 with its -libs and -bindings wheels; on a machine without internet carry those "
    "wheels, see /work/.library/device/README.md); cuda-python (cuda.bindings); torch + onnx to make the "
    "bundle; for FP16 with TensorRT 11 also nvidia-modelopt[onnx]"
)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def preflight() -> tuple[str, str, str]:
    """(gpu, cc, trt version) or exit 3 within seconds, naming what is missing."""
    from m3d_edge.errors import BackendError
    from m3d_edge.runtime.trt_backend import device_identity

    try:
        return device_identity()
    except BackendError as e:
        print(f"gpu_check: cannot run here: {e}\ngpu_check: {NEEDS}", file=sys.stderr, flush=True)
        sys.exit(3)


def volumes(n: int) -> list[np.ndarray]:
    """CT-like [1, 32, 256, 256] volumes through the runtime's own preprocessing (never uniform noise)."""
    from m3d_edge.runtime.imaging import preprocess
    from m3d_edge.runtime.imaging.phantom import phantom_hu

    return [
        np.asarray(preprocess(phantom_hu(seed=s))[0], np.float32).reshape(1, 32, 256, 256) for s in range(n)
    ]


def make_bundle(work: Path, preset: str, int8: bool) -> Path:
    from m3d_edge.bundle import read_manifest, sha256_file, write_manifest
    from m3d_edge.export.exporter import export_bundle
    from m3d_edge.export.tiny import write_tiny_checkpoint

    bundle = work / "bundle"
    if (bundle / "manifest.json").is_file():
        log(f"reusing {bundle}")
    else:
        log(f"writing the {preset} checkpoint and exporting it (no torch parity pass)")
        ckpt = write_tiny_checkpoint(work / "ckpt", family="phi3", preset=preset, seed=0)
        export_bundle(ckpt, bundle, validate=False, overwrite=True)
    m = read_manifest(bundle, verify=False)
    if int8 and "int8" not in m.graphs["vision"].variants:
        from m3d_edge.calibration.quantize import quantize_encoder

        vols = [v[None] for v in volumes(3)]
        for g in ("vision", "seg_encoder"):
            log(f"INT8 QDQ (symmetric, per-channel, MatMul/Gemm) variant of {g}")
            rel = f"int8/{g}.int8.onnx"
            (bundle / "int8").mkdir(exist_ok=True)
            quantize_encoder(bundle / m.graphs[g].file, bundle / rel, vols)
            files = [rel] + ([rel + ".data"] if (bundle / (rel + ".data")).is_file() else [])
            m.graphs[g].variants["int8"] = {
                "file": rel,
                "sha256": {f: sha256_file(bundle / f) for f in files},
            }
        write_manifest(bundle, m)
    return bundle


def greedy(decoder, cache_len, embeds, ids, new_tokens):
    from m3d_edge.runtime.generate import generate

    cache = decoder.new_cache(cache_len)
    t0 = time.perf_counter()
    gen = generate(decoder, cache, embeds, ids, max_new_tokens=new_tokens, eos_ids=set(), keep_hidden=True)
    return gen, time.perf_counter() - t0


def teacher_forced(decoder, cache_len, embeds, ids, ref_tokens) -> float:
    """Share of steps whose argmax equals the reference token when fed the reference tokens."""
    cache = decoder.new_cache(cache_len)
    decoder.step(cache, embeds, ids)
    hits = 0
    for k, tok in enumerate(ref_tokens):
        hits += int(np.argmax(decoder.logits[0])) == tok
        if k + 1 < len(ref_tokens):
            decoder.step_token(cache, tok)
    return hits / len(ref_tokens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "m3d-gpu-check")
    ap.add_argument("--bundle", type=Path, default=None, help="use this bundle instead of making one")
    ap.add_argument("--preset", default="bench", help="tiny-checkpoint preset (bench, wide, tiny)")
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--bandwidth-gbs", type=float, default=H200_GBS)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--opt-level", type=int, default=2, help="TensorRT builder optimization level (0-5)")
    ap.add_argument("--threads", type=int, default=0, help="ORT CPU reference threads (0: all)")
    args = ap.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]

    gpu, cc, trt_version = preflight()
    log(f"GPU {gpu} (sm{cc.replace('.', '')}), TensorRT {trt_version}")
    from m3d_edge.calibration.evaluate import dice, token_agreement
    from m3d_edge.export.engines import build_engines
    from m3d_edge.runtime.backend import BackendOptions
    from m3d_edge.runtime.pipeline import Pipeline
    from m3d_edge.runtime.trt_backend import (
        TrtDecoder,
        TrtGraphSession,
        device_identity,
        engine_dir_name,
        kv_cache_bytes,
        read_engine_json,
    )

    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or make_bundle(args.work, args.preset, "int8" in precisions)

    # -- reference: ORT CPU FP32 ---------------------------------------------------------------------------
    pipe = Pipeline.open(bundle, BackendOptions(threads=args.threads), verify=False, precision="fp32")
    dims, specs = pipe.dims, pipe.manifest.specs()
    vol = volumes(1)[0]
    t0 = time.perf_counter()
    state = pipe.prepare(vol)
    ref_vision = time.perf_counter() - t0
    ids = pipe.prompt_ids(QUESTION)
    embeds = pipe.embed(ids, state.image_embeds)
    cache_len = len(ids) + args.new_tokens
    ref, _ref_total = greedy(pipe.decoder, cache_len, embeds, ids, args.new_tokens)
    seg_hidden = ref.hidden[-1][None].astype(np.float32)  # a fixed seg prompt: the last post-norm state
    seg_emb = pipe.sessions["seg_encoder"].run({"image": state.image})["image_embedding"]
    ref_mask = pipe.sessions["seg_decoder"].run({"image_embedding": seg_emb, "seg_hidden": seg_hidden})
    ref_mask = ref_mask["mask_logits"][0, 0] > 0
    log(
        f"ORT CPU FP32 reference: {len(ids)}-token prompt, {args.new_tokens} tokens, mask {ref_mask.mean():.3f}"
    )

    # -- engines -----------------------------------------------------------------------------------------------
    def progress(name: str, event: str) -> None:
        if "/" not in name:  # top-level phases only
            log(f"  {name}: {event}")

    if "fp32" in precisions:
        build_engines(bundle, fp16=False, max_seq=args.max_seq, progress=progress, opt_level=args.opt_level)
    if "fp16" in precisions or "int8" in precisions:
        build_engines(bundle, fp16=True, max_seq=args.max_seq, progress=progress, opt_level=args.opt_level)
    if "int8" in precisions:  # encoders from their QDQ variants; the decoder is the fp16 plan
        build_engines(
            bundle,
            fp16=False,
            int8=True,
            max_seq=args.max_seq,
            progress=progress,
            opt_level=args.opt_level,
            graphs=("vision", "seg_encoder", "seg_decoder"),
        )
    gpu, cc, trt_version = device_identity()
    root = bundle / "engines"

    rows, ok = [], True
    for prec in precisions:
        folder = root / engine_dir_name(gpu, cc, trt_version, prec)
        dec_folder = root / engine_dir_name(gpu, cc, trt_version, "fp16" if prec == "int8" else prec)
        info, dec_info = read_engine_json(folder), read_engine_json(dec_folder)
        sess = {
            g: TrtGraphSession(folder / f"{g}.plan", specs[g], info)
            for g in ("vision", "seg_encoder", "seg_decoder")
        }
        dec = TrtDecoder(dec_folder / "decoder.plan", specs["decoder"], dims, pipe.embed_table, dec_info)
        vision_s, prefill_s, decode_tps, tokens = [], [], [], None
        for r in range(args.runs + 1):  # one warm-up
            t0 = time.perf_counter()
            emb = sess["vision"].run({"image": state.image})["image_embeds"]
            t_vis = time.perf_counter() - t0
            gen, _ = greedy(dec, cache_len, pipe.embed(ids, emb), ids, args.new_tokens)
            if r:
                vision_s.append(t_vis)
                prefill_s.append(gen.prefill_seconds)
                decode_tps.append(len(gen.step_seconds) / sum(gen.step_seconds))
            tokens = gen.tokens
        prefix, matches, n = token_agreement(ref.tokens, tokens)
        forced = teacher_forced(dec, cache_len, embeds, ids, ref.tokens)
        emb_cos = float(
            np.dot(emb.ravel(), state.image_embeds.ravel())
            / (np.linalg.norm(emb) * np.linalg.norm(state.image_embeds) + 1e-30)
        )
        t_emb = sess["seg_encoder"].run({"image": state.image})["image_embedding"]
        mask = (
            sess["seg_decoder"].run({"image_embedding": t_emb, "seg_hidden": seg_hidden})["mask_logits"][0, 0]
            > 0
        )
        d = dice(ref_mask, mask)
        passed = tokens == ref.tokens and d >= 0.95 if prec == "fp32" else forced >= 0.97 and d >= 0.95
        ok &= passed
        tps = statistics.median(decode_tps)
        avg_len = len(ids) + args.new_tokens / 2
        step_bytes = (
            (folder / "decoder.plan" if prec != "int8" else dec_folder / "decoder.plan").stat().st_size
        )
        # past read + full present written (the new contract's Concat): one cache each, = both buffers' bytes
        step_bytes += kv_cache_bytes(dims, int(avg_len), dec.kv_dtype)
        roofline = args.bandwidth_gbs * 1e9 / step_bytes
        rows.append(
            {
                "precision": prec,
                "vision_s": statistics.median(vision_s),
                "prefill_s": statistics.median(prefill_s),
                "ttft_s": statistics.median(vision_s) + statistics.median(prefill_s),
                "decode_tok_s": tps,
                "decode_spread": [min(decode_tps), max(decode_tps)],
                "bytes_per_step": step_bytes,
                "roofline_tok_s": roofline,
                "roofline_pct": 100 * tps / roofline,
                "tokens_identical": tokens == ref.tokens,
                "prefix": prefix,
                "free_running_agreement": matches / n,
                "teacher_forced_agreement": forced,
                "vision_cosine": emb_cos,
                "mask_dice": d,
                "mask_fraction": float(mask.mean()),
                "passed": passed,
                "notes": sorted({g.get("note", "") for g in info["graphs"].values()} - {""}),
            }
        )
        log(f"{prec}: {'PASS' if passed else 'FAIL'} {json.dumps(rows[-1])}")

    ref_row = {
        "vision_s": ref_vision,
        "decode_tok_s": len(ref.step_seconds) / sum(ref.step_seconds),
        "prefill_s": ref.prefill_seconds,
    }
    print(
        f"\nTensorRT on {gpu} (sm{cc.replace('.', '')}), TensorRT {trt_version}; bandwidth {args.bandwidth_gbs:.0f} GB/s;"
        f" {len(ids)}-token prompt, {args.new_tokens} new tokens, median of {args.runs}"
    )
    head = (
        f"{'engine':<10}{'vision ms':>10}{'prefill ms':>11}{'TTFT ms':>9}{'tok/s':>9}{'roofline %':>11}"
        f"{'forced':>8}{'free':>7}{'Dice':>7}  gate"
    )
    print(head)
    print("-" * len(head))
    print(
        f"{'ORT CPU':<10}{1e3 * ref_row['vision_s']:>10.1f}{1e3 * ref_row['prefill_s']:>11.1f}"
        f"{1e3 * (ref_row['vision_s'] + ref_row['prefill_s']):>9.1f}{ref_row['decode_tok_s']:>9.1f}"
        f"{'':>11}{'ref':>8}{'ref':>7}{'ref':>7}"
    )
    for r in rows:
        print(
            f"{'TRT ' + r['precision']:<10}{1e3 * r['vision_s']:>10.1f}{1e3 * r['prefill_s']:>11.1f}"
            f"{1e3 * r['ttft_s']:>9.1f}{r['decode_tok_s']:>9.1f}{r['roofline_pct']:>10.1f}%"
            f"{100 * r['teacher_forced_agreement']:>7.0f}%{100 * r['free_running_agreement']:>6.0f}%"
            f"{r['mask_dice']:>7.3f}  {'pass' if r['passed'] else 'FAIL'}"
        )
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "gpu": gpu,
        "compute_capability": cc,
        "trt_version": trt_version,
        "bandwidth_gbs": args.bandwidth_gbs,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "reference": ref_row,
        "engines": rows,
        "passed": ok,
        "seconds": time.perf_counter() - T0,
    }
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"{'all gates passed' if ok else 'a gate FAILED'}; wrote {out_dir / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
