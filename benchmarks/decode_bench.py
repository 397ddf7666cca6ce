"""Decode tokens/s and time to first token: m3d-edge runtime vs PyTorch eager (issue 3, docs/architecture.md §8).

    python benchmarks/decode_bench.py --ckpt CKPT --bundle BUNDLE [--runs 3] [--threads 2]

Each engine runs in its own process on the same weights, the same ~280-token prompt (BOS + 256 image
tokens + question), 64 new greedy tokens (end-of-sequence masked so every run makes 64), batch 1, one
warm-up and the median of ``--runs``. Engines: ``m3d`` (this runtime, ORT CPU FP32), ``torch`` (PyTorch
eager FP32 through transformers' generate, as M3D runs it), ``torch-bf16``. The volume is the real chest
CT from ../shared/data/ct when present, else the project's synthetic phantom. Results go to
benchmarks/results/decode_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Noise, machine, peak_rss_mb, save, summary, wait_for_quiet

QUESTION = "What is the abnormality in the right lung and how large is it? Describe its location."
NEW_TOKENS = 64
# the project's shared data folder beside the checkout (or beside the folder of worktrees)
SHARED_CT = next(
    (
        p / "shared" / "data" / "ct" / "lung1_image.nrrd"
        for p in Path(__file__).resolve().parents[1:4]
        if (p / "shared" / "data" / "ct" / "lung1_image.nrrd").is_file()
    ),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "lung1_image.nrrd",
)


def load_volume() -> tuple[np.ndarray, str]:
    """[1, 32, 256, 256] in [0, 1] through the runtime's own preprocessing."""
    from m3d_edge.runtime.imaging import preprocess

    if SHARED_CT.is_file():
        import nrrd

        data, _ = nrrd.read(str(SHARED_CT))  # (x, y, z)
        hu = np.ascontiguousarray(np.transpose(data, (2, 1, 0))).astype(np.float32)
        return preprocess(hu)[0], "lung1 chest CT"
    _z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (48, 256, 256)), indexing="ij")
    hu = np.where(x**2 / 0.7 + y**2 / 0.4 < 1, 40.0, -1000.0) + np.where(
        (x - 0.3) ** 2 + y**2 < 0.05, 60.0, 0.0
    )
    return preprocess(hu.astype(np.float32))[0], "synthetic phantom"


def run_m3d(bundle: Path, threads: int, runs: int) -> dict:
    from m3d_edge.runtime.backend import BackendOptions
    from m3d_edge.runtime.generate import generate
    from m3d_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.open(bundle, BackendOptions(threads=threads))
    volume, source = load_volume()
    ids = pipe.prompt_ids(QUESTION)
    vision, prefill, decode, loop_share = [], [], [], []
    for i in range(runs + 1):
        pipe.state = None
        t0 = time.perf_counter()
        state = pipe.prepare(volume)
        t_vision = time.perf_counter() - t0
        embeds = pipe.embed(ids, state.image_embeds)
        cache = pipe.decoder.new_cache(len(ids) + NEW_TOKENS)
        ort_before = pipe.sessions["decoder"].seconds
        t_gen = time.perf_counter()
        gen = generate(pipe.decoder, cache, embeds, ids, max_new_tokens=NEW_TOKENS, eos_ids=set())
        decode_wall = time.perf_counter() - t_gen - gen.prefill_seconds
        ort_decode = pipe.sessions["decoder"].seconds - ort_before - gen.prefill_seconds
        if i == 0:
            continue  # warm-up
        steps = sum(gen.step_seconds)
        vision.append(t_vision)
        prefill.append(gen.prefill_seconds)
        decode.append(len(gen.step_seconds) / steps)
        # the whole loop between ORT calls (sampling, embedding lookup, binding) as a share of decode time
        loop_share.append(1.0 - ort_decode / decode_wall)
    return {
        "prompt_tokens": len(ids),
        "volume": source,
        "vision_s": summary(vision),
        "prefill_s": summary(prefill),
        "decode_tok_s": summary(decode),
        "ttft_s": summary([v + p for v, p in zip(vision, prefill, strict=True)]),
        "loop_overhead_share": summary(loop_share),
        "tokens": gen.tokens,
    }


def run_torch(ckpt: Path, threads: int, runs: int, bf16: bool) -> dict:
    import torch

    from m3d_edge.export.reference import ReferenceModel
    from m3d_edge.export.tokenizer import convert_tokenizer

    torch.set_num_threads(threads)
    ref = ReferenceModel.from_checkpoint(ckpt)
    dtype = torch.bfloat16 if bf16 else torch.float32
    ref.model.to(dtype)
    volume, source = load_volume()
    ids = convert_tokenizer(ckpt).encode("<im_patch>" * 256 + " " + QUESTION).ids
    image = torch.from_numpy(volume)[None].to(dtype)
    input_ids = torch.tensor([ids])
    vision, ttft, decode = [], [], []
    with torch.inference_mode():
        for i in range(runs + 1):
            t0 = time.perf_counter()
            feats = ref.encode_images(image)
            t_vision = time.perf_counter() - t0
            embeds = ref.splice(input_ids, feats)
            kw = {"inputs_embeds": embeds, "do_sample": False, "attention_mask": torch.ones_like(input_ids)}
            t1 = time.perf_counter()
            ref.model.generate(**kw, max_new_tokens=1, min_new_tokens=1)
            t_first = time.perf_counter() - t1
            t2 = time.perf_counter()
            out = ref.model.generate(**kw, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            t_all = time.perf_counter() - t2
            if i == 0:
                continue
            vision.append(t_vision)
            ttft.append(t_vision + t_first)
            decode.append((NEW_TOKENS - 1) / (t_all - t_first))
    return {
        "prompt_tokens": len(ids),
        "volume": source,
        "vision_s": summary(vision),
        "prefill_s": summary([t - v for t, v in zip(ttft, vision, strict=True)]),
        "decode_tok_s": summary(decode),
        "ttft_s": summary(ttft),
        "tokens": out[0].tolist(),
    }


def run_genai(model_dir: Path, bundle: Path, threads: int, runs: int) -> dict:
    """onnxruntime-genai as a peer on the same decoder weights (its builder's FP32 CPU model).

    genai needs ``input_ids`` (it cannot take spliced embeddings), so it gets the same token ids with the
    256 image tokens embedded as tokens: the work per step is the same.
    """
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    from m3d_edge.runtime.prompts import build_prompt

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids = tok.encode(build_prompt(QUESTION, "<im_patch>", 256)).ids
    config = og.Config(str(model_dir))
    config.clear_providers()
    model = og.Model(config)
    ttft, decode = [], []
    for i in range(runs + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, max_length=len(ids) + NEW_TOKENS, min_length=len(ids) + NEW_TOKENS
        )
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens([ids])
        gen.generate_next_token()
        t_first = time.perf_counter() - t0
        n = 1
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        t_all = time.perf_counter() - t0
        if i == 0:
            continue
        ttft.append(t_first)
        decode.append((n - 1) / (t_all - t_first))
    return {
        "prompt_tokens": len(ids),
        "prefill_s": summary(ttft),
        "decode_tok_s": summary(decode),
        "tokens": [],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="m3d,torch,torch-bf16")
    ap.add_argument("--name", default="bench")
    ap.add_argument(
        "--genai-model", type=Path, help="onnxruntime-genai model folder built from the same weights"
    )
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        if args.child == "m3d":
            res = run_m3d(args.bundle, args.threads, args.runs)
        elif args.child == "genai":
            res = run_genai(args.genai_model, args.bundle, args.threads, args.runs)
        else:
            res = run_torch(args.ckpt, args.threads, args.runs, bf16=args.child == "torch-bf16")
        res["peak_rss_mb"] = peak_rss_mb()
        print("RESULT " + json.dumps(res))
        return
    results: dict = {
        "machine": machine(),
        "protocol": f"{NEW_TOKENS} new tokens, greedy, batch 1",
        "engines": {},
    }
    for engine in args.engines.split(","):
        quiet = wait_for_quiet()
        cmd = [sys.executable, __file__, "--ckpt", str(args.ckpt), "--bundle", str(args.bundle)]
        cmd += ["--runs", str(args.runs), "--threads", str(args.threads), "--child", engine]
        if args.genai_model:
            cmd += ["--genai-model", str(args.genai_model)]
        with Noise() as noise:
            out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(engine, "failed:", out.stderr[-1500:])
            continue
        res = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        res["machine_load_before"], res["machine_load_during"] = round(quiet, 2), round(noise.load, 2)
        repeat = sum(1 for k in results["engines"] if k.split("#")[0] == engine)
        results["engines"][f"{engine}#{repeat + 1}" if repeat else engine] = (
            res  # a repeated engine keeps both
        )
        print(engine, {k: v for k, v in res.items() if k != "tokens"})
    eng = results["engines"]
    if "m3d" in eng and "torch" in eng:
        m, t = eng["m3d"], eng["torch"]
        results["ratios_vs_torch_fp32"] = {
            "decode_tok_s": m["decode_tok_s"]["median"] / t["decode_tok_s"]["median"],
            "ttft": m["ttft_s"]["median"] / t["ttft_s"]["median"],
            "prefill": m["prefill_s"]["median"] / t["prefill_s"]["median"],
            "vision": m["vision_s"]["median"] / t["vision_s"]["median"],
            "same_tokens": m["tokens"] == t["tokens"],
        }
    if "m3d" in eng and "torch-bf16" in eng:
        results["ratios_vs_torch_bf16"] = {
            "decode_tok_s": eng["m3d"]["decode_tok_s"]["median"]
            / eng["torch-bf16"]["decode_tok_s"]["median"],
            "ttft": eng["m3d"]["ttft_s"]["median"] / eng["torch-bf16"]["ttft_s"]["median"],
        }
    if "m3d" in eng and "genai" in eng:
        # the same precision on both sides: the bundle's decoder and the peer folder built at it
        results["ratios_vs_genai"] = {
            "precision": json.loads((args.bundle / "manifest.json").read_text())["graphs"]["decoder"][
                "precision"
            ],
            "decode_tok_s": eng["m3d"]["decode_tok_s"]["median"] / eng["genai"]["decode_tok_s"]["median"],
            "prefill": eng["m3d"]["prefill_s"]["median"] / eng["genai"]["prefill_s"]["median"],
        }
    print(json.dumps({k: v for k, v in results.items() if k.startswith("ratios")}, indent=2))
    print("saved", save(f"decode_{args.name}", results))


if __name__ == "__main__":
    main()
