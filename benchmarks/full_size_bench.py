"""Full-size M3D-LaMed (released dims, random weights): export cost, the pipeline on the real chest CT,
decode against the bandwidth roofline, and PyTorch eager on the same weights (issue 13, docs/architecture.md §8).

    python benchmarks/full_size_bench.py export --ckpt CKPT --out BUNDLE --precision int4 --name phi3
    python benchmarks/full_size_bench.py run --bundle BUNDLE --name phi3-int4        # m3d-edge run on the CT
    python benchmarks/full_size_bench.py decode --bundle BUNDLE --name phi3-int4     # 280 + 64 tokens
    python benchmarks/full_size_bench.py torch --ckpt CKPT --dtype bf16 --name phi3  # HF generate, eager

Every step runs in its own process (``measure.py`` samples the process tree's RSS) and appends one record
to benchmarks/results/full_size.json. ``run`` converts the NRRD chest CT to NIfTI (pynrrd + nibabel) so
``m3d-edge run`` reads it like a user's file. ``decode`` follows decode_bench's protocol (BOS + 256 image
tokens + question, 64 new greedy tokens with end-of-sequence masked, one warm-up, median of ``--runs``)
and measures, in the same process, the memory copy bandwidth: roofline tok/s = copy bandwidth / bytes of
decoder weights read per token (the decoder's external data: MatMulNBits blocks, scales, zero points and
the norms; STREAM convention, read + write bytes per second of a 1 GiB numpy copy). ``torch`` loads the
decoder tensor by tensor from the shards straight into ``--dtype`` (FP32 of the whole Phi-3-4B, 16 GB,
does not fit beside the other tenants of a 24 GB machine; ``--layers k`` runs the first k layers only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import Noise, machine, peak_rss_mb, summary, wait_for_quiet  # noqa: E402
from decode_bench import NEW_TOKENS, QUESTION, SHARED_CT, load_volume, run_m3d  # noqa: E402

RESULTS = HERE / "results" / "full_size.json"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def append(record: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    record = {
        **record,
        "cpu": cpu_name(),
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows.append(record)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def measured(cmd: list[str]) -> dict:
    from measure import measure

    quiet = wait_for_quiet(timeout=60)
    with Noise() as noise:
        res = measure(cmd)
    res["machine_load_before"], res["machine_load_during"] = round(quiet, 2), round(noise.load, 2)
    return res


def ct_nifti(out: Path) -> Path:
    """The NRRD chest CT as NIfTI (the affine from the NRRD's space directions and origin, LPS -> RAS)."""
    import nibabel as nib
    import nrrd

    if out.is_file():
        return out
    data, header = nrrd.read(str(SHARED_CT))
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], float).T
    affine[:3, 3] = np.asarray(header["space origin"], float)
    if "left-posterior" in str(header.get("space", "")):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    nib.save(nib.Nifti1Image(np.asarray(data, np.int16), affine), str(out))
    return out


def cmd_export(a) -> None:
    cli = [sys.executable, "-m", "m3d_edge.cli.app", "export", str(a.ckpt), "-o", str(a.out), "--overwrite"]
    cli += ["--precision", a.precision] + (["--no-tensorrt-graph"] if a.no_trt else [])
    res = measured(cli)
    print(json.dumps(res), flush=True)
    res.update(step="export", name=a.name, precision=a.precision, bundle_bytes=dir_bytes(a.out))
    manifest = Path(a.out) / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        res["graph_bytes"] = {
            g: sum((Path(a.out) / f).stat().st_size for f in e["sha256"]) for g, e in m["graphs"].items()
        }
        res["decoder_export"] = m["source"].get("decoder_export")
    append(res)


def cmd_run(a) -> None:
    study = ct_nifti(Path(a.work) / "lung1.nii.gz")
    out = Path(a.work) / f"run-{a.name}"
    cli = [sys.executable, "-m", "m3d_edge.cli.app", "run", str(a.bundle), str(study), "--task", "report"]
    cli += ["--out", str(out), "--max-new-tokens", str(a.max_new_tokens)]
    bw = copy_bandwidth()
    res = measured(cli)
    bw = max(bw, copy_bandwidth())  # before and after the run: the machine drifts
    print(json.dumps(res), flush=True)
    result = out / "result.json"
    if result.is_file():
        r = json.loads(result.read_text())
        res["timings"] = r.get("timings", {})
        res["new_tokens"] = len(r.get("tokens", []))
        res["decode_tok_s"] = res["timings"].get("decode_tokens_per_s")
        res["answer"] = r.get("text", "")[:120]
        m = json.loads((Path(a.bundle) / "manifest.json").read_text())
        entry = m["graphs"]["decoder"]
        weights = sum((Path(a.bundle) / f).stat().st_size for f in entry["sha256"] if f.endswith(".data"))
        res.update(
            precision=entry["precision"],
            decoder_weight_bytes=weights,
            copy_bandwidth_gb_s=round(bw / 1e9, 2),
            roofline_tok_s=round(bw / weights, 2),
            roofline_share=round((res["decode_tok_s"] or 0) / (bw / weights), 3),
        )
    res.update(step="run", name=a.name, study="lung1 chest CT (NRRD -> NIfTI)")
    append(res)


def copy_bandwidth(nbytes: int = 1 << 30, runs: int = 5) -> float:
    """STREAM-copy bandwidth (read + write bytes / s) of a numpy copy, best of ``runs``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def child_decode(a) -> dict:
    from m3d_edge.bundle import read_manifest

    bw = copy_bandwidth()
    res = run_m3d(Path(a.bundle), a.threads, a.runs)
    bw = max(bw, copy_bandwidth())  # before and after: the machine drifts
    m = read_manifest(a.bundle, verify=False)
    entry = m.graphs["decoder"]
    weights = sum((Path(a.bundle) / f).stat().st_size for f in entry.sha256 if f.endswith(".data"))
    roof = bw / weights
    res.update(
        precision=entry.precision,
        decoder_weight_bytes=weights,
        copy_bandwidth_gb_s=round(bw / 1e9, 2),
        roofline_tok_s=round(roof, 2),
        roofline_share=round(res["decode_tok_s"]["median"] / roof, 3),
        peak_rss_mb=peak_rss_mb(),
    )
    return res


def child_torch(a) -> dict:
    """transformers' generate (eager) on the spliced prompt; the model loaded tensor by tensor in ``dtype``."""
    import torch
    from safetensors import safe_open

    from m3d_edge.export.checkpoint import INDEX, LamedConfig, read_config, read_json
    from m3d_edge.export.reference import ReferenceModel, _materialize_buffers, build_model
    from m3d_edge.export.tokenizer import convert_tokenizer

    torch.set_num_threads(a.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    cfg = read_config(a.ckpt)
    if a.layers:
        cfg = LamedConfig(cfg.family, {**cfg.raw, "num_hidden_layers": a.layers})
    with torch.device("meta"):
        model = build_model(cfg)
    wanted = set(model.state_dict())
    where = read_json(Path(a.ckpt) / INDEX)["weight_map"]
    state = {}
    for fname in sorted(set(where.values())):
        with safe_open(str(Path(a.ckpt) / fname), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                if name in wanted:
                    state[name] = f.get_tensor(name).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    _materialize_buffers(model)
    model.eval()
    ref = ReferenceModel(model, cfg)
    volume, source = load_volume()
    ids = convert_tokenizer(a.ckpt).encode("<im_patch>" * 256 + " " + QUESTION).ids
    image = torch.from_numpy(volume)[None].to(dtype)
    input_ids = torch.tensor([ids])
    vision, prefill, decode = [], [], []
    with torch.inference_mode():
        for i in range(a.runs + 1):
            t0 = time.perf_counter()
            embeds = ref.splice(input_ids, ref.encode_images(image))
            t_vision = time.perf_counter() - t0
            kw = {"inputs_embeds": embeds, "do_sample": False, "attention_mask": torch.ones_like(input_ids)}
            t1 = time.perf_counter()
            model.generate(**kw, max_new_tokens=1, min_new_tokens=1)
            t_first = time.perf_counter() - t1
            n = a.new_tokens
            t2 = time.perf_counter()
            model.generate(**kw, max_new_tokens=n, min_new_tokens=n)
            t_all = time.perf_counter() - t2
            if i == 0 and a.runs > 0:
                continue
            vision.append(t_vision)
            prefill.append(t_first)
            decode.append((n - 1) / max(1e-9, t_all - t_first))
    return {
        "dtype": a.dtype,
        "layers": a.layers or int(read_config(a.ckpt).raw["num_hidden_layers"]),
        "volume": source,
        "prompt_tokens": len(ids),
        "vision_s": summary(vision),
        "prefill_s": summary(prefill),
        "ttft_s": summary([v + p for v, p in zip(vision, prefill, strict=True)]),
        "decode_tok_s": summary(decode),
        "peak_rss_mb": peak_rss_mb(),
    }


def in_child(a, step: str) -> None:
    """Run ``step`` in a fresh process (one engine per process) and record what it prints."""
    argv = [sys.executable, __file__, *sys.argv[1:], "--child"]
    quiet = wait_for_quiet(timeout=60)
    with Noise() as noise:
        out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ})
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        append({"step": step, "name": a.name, "failed": out.stderr[-2000:]})
        return
    res = json.loads(line[7:])
    res.update(
        step=step, name=a.name, machine_load_before=round(quiet, 2), machine_load_during=round(noise.load, 2)
    )
    append(res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=("export", "run", "decode", "torch"))
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--no-trt", action="store_true", help="export without the standard-op TensorRT decoder")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--layers", type=int, default=0, help="torch: first k decoder layers only")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--work", default="/tmp")
    ap.add_argument("--name", default="full")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.step == "export":
        cmd_export(a)
    elif a.step == "run":
        cmd_run(a)
    elif a.child:
        res = child_decode(a) if a.step == "decode" else child_torch(a)
        print("RESULT " + json.dumps(res, default=float))
    else:
        in_child(a, a.step)


if __name__ == "__main__":
    main()
