"""INT8/INT4 benchmark on a bench-size bundle (docs/architecture.md §8): calibrate, then measure speed and accuracy.

    python benchmarks/int8_bench.py --work /tmp/int8bench            # exports the bench bundle if missing
    python benchmarks/int8_bench.py --bundle /tmp/int8bench/bundle   # reuse an exported bench bundle (copied)

One process: ``calibrate_bundle`` (forced, so every variant stays measurable; the gate verdicts are recorded)
on the real CT volumes in ``../shared/data/ct`` (lung1 NRRD -> NIfTI, cranium HU -> NIfTI; augmented with
flips/crops to the sample count), then the docs/architecture.md §8 protocol per configuration: a 280-token prompt
(BOS + 256 image tokens + question), 64 new greedy tokens, batch 1, 2 threads, one warm-up, median of
``--repeats`` runs, each run on a fresh study state (so TTFT includes the vision encoder). The configurations
are interleaved in one process (not one process each as docs/architecture.md §8 asks: the machine is shared and its load
drifts over minutes, so same-time ratios are the steadier figure). Before each run the script waits (up to
60 s) for other processes to use < 0.3 cores; the load during each run is read from /proc/stat and a run
disturbed by > 0.5 cores is repeated once. ORT profiles show which kernels ran.
Results: ``benchmarks/results/int8_bench.json`` and ``int8_bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


# -- machine noise ------------------------------------------------------------------------------------
def _cpu_ticks() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [float(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


class Load:
    """Foreign CPU load during a block: busy CPU-seconds of the machine minus this process's own."""

    def __enter__(self):
        self.t0, self.c0, self.own0 = time.perf_counter(), _cpu_ticks(), os.times()
        return self

    def __exit__(self, *exc):
        hz = os.sysconf("SC_CLK_TCK")
        c1, own1 = _cpu_ticks(), os.times()
        self.wall = time.perf_counter() - self.t0
        busy = (c1[0] - self.c0[0]) / hz
        own = (own1.user - self.own0.user) + (own1.system - self.own0.system)
        self.foreign_cores = max(0.0, (busy - own) / self.wall) if self.wall > 0 else 0.0
        return False


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return sorted(f for f in flags if f.startswith(("avx512_vnni", "avx512f", "amx", "avx_vnni", "avx2")))


# -- data -----------------------------------------------------------------------------------------------
def real_ct_folder(out: Path) -> Path:
    """lung1 (NRRD) and cranium (npz HU) written as NIfTI studies that ``load_study`` reads."""
    import nibabel as nib
    import nrrd

    out.mkdir(parents=True, exist_ok=True)
    data, header = nrrd.read(str(SHARED_CT / "lung1_image.nrrd"))  # (x, y, z), LPS
    dirs = np.asarray(header["space directions"], float)
    origin = np.asarray(header["space origin"], float)
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = dirs.T, origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    nib.save(nib.Nifti1Image(data.astype(np.int16), ras), str(out / "lung1.nii.gz"))
    z = np.load(SHARED_CT / "cranium_ct_hu.npz")
    hu, sp = z["hu"], z["spacing_mm"]  # (z, y, x)
    aff = np.diag([-sp[2], -sp[1], sp[0], 1.0])  # identity LPS direction, written as RAS
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), aff), str(out / "cranium.nii.gz"))
    return out


def ensure_bundle(work: Path) -> Path:
    from m3d_edge.export.exporter import export_bundle
    from m3d_edge.export.tiny import write_tiny_checkpoint

    bundle = work / "bundle"
    if not (bundle / "manifest.json").exists():
        ckpt = write_tiny_checkpoint(work / "ckpt", "phi3", preset="bench")
        export_bundle(ckpt, bundle, overwrite=True)
    return bundle


# -- measurements ---------------------------------------------------------------------------------------
def wait_quiet(limit: float = 0.3, max_wait: float = 60.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``limit`` cores; returns the last load."""
    t0 = time.perf_counter()
    while True:
        with Load() as ld:
            time.sleep(0.5)
        if ld.foreign_cores < limit or time.perf_counter() - t0 > max_wait:
            return ld.foreign_cores


def protocol(
    bundle: Path, configs: dict[str, dict[str, str]], volume: np.ndarray, repeats: int, threads: int
):
    """docs/architecture.md §8, configurations interleaved (fp32, int8, int4, fp32, ...) so machine load hits each alike.

    Each run is a fresh study (vision runs, no KV prefix reuse); one warm-up round; a run disturbed by
    other processes (more than 0.5 cores) is repeated once.
    """
    from m3d_edge.runtime.backend import BackendOptions
    from m3d_edge.runtime.pipeline import Pipeline

    question = "Can you provide a caption consists of findings for this medical image?"
    pipes = {
        name: Pipeline.open(bundle, BackendOptions(threads=threads), verify=False, precision=prec)
        for name, prec in configs.items()
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}

    def one(pipe) -> dict:
        pipe.state = None  # a new study: vision runs again, no KV prefix reuse
        before = wait_quiet()
        with Load() as load:
            r = pipe.ask(volume, question, max_new_tokens=64)
        steps = r.timings["decode_steps"]
        return {
            "vision_s": r.timings["vision"],
            "prefill_s": r.timings["prefill"],
            "ttft_s": r.timings["vision"] + r.timings["prefill"],
            "decode_tokens": len(steps),
            "decode_tokens_per_s": len(steps) / sum(steps) if steps else None,
            "foreign_cores": round(load.foreign_cores, 2),
            "foreign_cores_before": round(before, 2),
        }

    for k in range(repeats + 1):
        for name, pipe in pipes.items():
            run = one(pipe)
            if run["foreign_cores"] > 0.5:
                retry = one(pipe)
                retry["retried"] = True
                run = retry if retry["foreign_cores"] < run["foreign_cores"] else run
            if k:
                runs[name].append(run)
            print(f"  {name} round {k}: {json.dumps(run)}", flush=True)
    out = {}
    for name, rs in runs.items():
        med = {
            key: statistics.median([x[key] for x in rs if x[key] is not None])
            for key in ("vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "foreign_cores")
        }
        spread = {
            key: [min(x[key] for x in rs), max(x[key] for x in rs)]
            for key in ("vision_s", "prefill_s", "decode_tokens_per_s")
        }
        pipe = pipes[name]
        out[name] = {
            "precision": pipe.precisions,
            "providers": sorted(set(pipe.provenance()["provider"].values())),
            "prompt_tokens": len(pipe.prompt_ids(question)),
            "median": med,
            "spread": spread,
            "runs": rs,
        }
    return out


def profile_ops(path: Path, inputs_fn, threads: int) -> dict[str, float]:
    """Run a graph once under the ORT profiler; total microseconds per executed kernel (op name)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, inputs_fn(sess))
        prof = sess.end_profiling()
        events = json.loads(Path(prof).read_text())
        per_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                per_op[op] = per_op.get(op, 0.0) + float(e.get("dur", 0))
        return dict(sorted(per_op.items(), key=lambda kv: -kv[1])[:12])


def decoder_inputs(dims, past: int = 280):
    from m3d_edge.bundle import kv_names

    def make(sess):
        feeds = {
            "inputs_embeds": np.random.default_rng(0).standard_normal((1, 1, dims.hidden_size), np.float32),
            "attention_mask": np.ones((1, past + 1), np.int64),
            "position_ids": np.full((1, 1), past, np.int64),
        }
        for i in range(dims.num_layers):
            pk, pv, _, _ = kv_names(i)
            shape = (past, 1, dims.num_kv_heads, dims.head_dim)
            feeds[pk] = np.zeros(shape, np.float32)
            feeds[pv] = np.zeros(shape, np.float32)
        return feeds

    return make


def step_latency(path: Path, make, threads: int, steps: int = 20) -> float:
    """Median latency of one decode step (past 280) of a decoder graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = make(sess)
    for _ in range(3):
        sess.run(None, feeds)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "int8bench")
    ap.add_argument(
        "--bundle", type=Path, default=None, help="an exported bench bundle (copied, not modified)"
    )
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--held-out", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not SHARED_CT.is_dir():
        print(f"no real CT volumes at {SHARED_CT}", file=sys.stderr)
        return 2

    from m3d_edge.bundle import read_manifest
    from m3d_edge.calibration import calibrate_bundle
    from m3d_edge.calibration.quantize import quantize_decoder
    from m3d_edge.runtime.imaging import load_study, preprocess

    t_all = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.bundle or ensure_bundle(args.work)
    bundle = args.work / "calibrated"
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(src, bundle, ignore=shutil.ignore_patterns("calibration", "*.int*.onnx*"))
    data = real_ct_folder(args.work / "studies")

    log = []

    def progress(stage, done, total):
        log.append((round(time.perf_counter() - t_all, 1), stage, done, total))
        print(f"[{time.perf_counter() - t_all:7.1f}s] {stage} {done}/{total}", flush=True)

    with Load() as cal_load:
        report = calibrate_bundle(
            bundle,
            data,
            method=args.method,
            samples=args.samples,
            held_out=args.held_out,
            force=True,
            threads=args.threads,
            progress=progress,
        )
    print(report.summary(), flush=True)
    manifest = read_manifest(bundle, verify=True)

    volume, _ = preprocess(load_study(data / "lung1.nii.gz"))
    configs = {
        "fp32": {"vision": "fp32", "decoder": "fp32", "seg_encoder": "fp32", "seg_decoder": "fp32"},
        "int8": {"vision": "int8", "decoder": "int8", "seg_encoder": "fp32", "seg_decoder": "fp32"},
        "int4": {"vision": "int8", "decoder": "int4", "seg_encoder": "fp32", "seg_decoder": "fp32"},
    }
    progress("protocol", 0, 1)
    protocol_res = protocol(bundle, configs, volume, args.repeats, args.threads)
    progress("protocol", 1, 1)
    base = protocol_res["fp32"]["median"]
    ratios = {
        name: {
            "vision_speedup": base["vision_s"] / p["median"]["vision_s"],
            "decode_speedup": p["median"]["decode_tokens_per_s"] / base["decode_tokens_per_s"],
            "ttft_speedup": base["ttft_s"] / p["median"]["ttft_s"],
        }
        for name, p in protocol_res.items()
    }

    # which kernels ran
    progress("profiles", 0, 1)
    image = {"image": volume[None].astype(np.float32)}
    kernels = {
        "vision.fp32": profile_ops(bundle / "vision.onnx", lambda s: image, args.threads),
        "vision.int8": profile_ops(bundle / "vision.int8.onnx", lambda s: image, args.threads),
    }
    make = decoder_inputs(manifest.dims)
    for prec in ("fp32", "int8", "int4"):
        f = manifest.graphs["decoder"].resolve(prec)[0]
        kernels[f"decoder.{prec}"] = profile_ops(bundle / f, make, args.threads)
    # accuracy_level: the same int4 decoder with accuracy_level 0 (fp32 compute) vs 4 (int8 compute)
    progress("accuracy_level check", 0, 1)
    acc = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in (0, 4):
            p = Path(tmp) / f"dec{level}.onnx"
            quantize_decoder(bundle / "decoder.onnx", p, bits=4, block_size=32, accuracy_level=level)
            with Load() as ld:
                acc[f"int4_accuracy_level_{level}_step_ms"] = 1000 * step_latency(p, make, args.threads)
            acc[f"int4_accuracy_level_{level}_foreign_cores"] = round(ld.foreign_cores, 2)
        acc["fp32_step_ms"] = 1000 * step_latency(bundle / "decoder.onnx", make, args.threads)

    import onnxruntime as ort

    result = {
        "what": "INT8/INT4 on the bench bundle (ViT-B encoders, Phi-3-shaped 1024x8 decoder, random weights)",
        "command": "python benchmarks/int8_bench.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_flags": cpu_flags(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "threads": args.threads,
            "shared": "the machine was shared with other engineers' test runs; foreign_cores is the CPU load "
            "of other processes (in cores) measured from /proc/stat around each run",
        },
        "calibration": {
            "method": args.method,
            "seconds": report.seconds,
            "foreign_cores": round(cal_load.foreign_cores, 2),
            "data": report.data,
            "defaults": report.defaults,
            "variants": [
                {
                    "graph": v.graph,
                    "precision": v.precision,
                    "passed": v.passed,
                    "checks": v.checks,
                    "metrics": v.metrics,
                    "speed": v.speed,
                    "size_ratio": v.bytes / v.bytes_fp32,
                }
                for v in report.variants
            ],
        },
        "protocol": protocol_res,
        "ratios_vs_fp32": ratios,
        "kernels_us": kernels,
        "matmulnbits_accuracy_level": acc,
        "seconds": time.perf_counter() - t_all,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_bench.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (args.out / "int8_bench.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [
        "# INT8/INT4 benchmark (bench bundle, CPU, 2 threads)",
        "",
        f"Command: `{r['command']}`; onnxruntime {r['machine']['onnxruntime']}, CPU flags "
        f"{', '.join(r['machine']['cpu_flags'])}. {r['machine']['shared']}.",
        "",
        "## Protocol (280-token prompt, 64 greedy tokens, fresh study per run, median of runs)",
        "",
        "| config | vision s | prefill s | TTFT s | decode tok/s | vision x | decode x | TTFT x | foreign cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in r["protocol"].items():
        m, q = p["median"], r["ratios_vs_fp32"][name]
        lines.append(
            f"| {name} | {f(m['vision_s'], 2)} | {f(m['prefill_s'], 3)} | {f(m['ttft_s'], 2)} | "
            f"{f(m['decode_tokens_per_s'], 1)} | {f(q['vision_speedup'], 2)} | {f(q['decode_speedup'], 2)} | "
            f"{f(q['ttft_speedup'], 2)} | {f(m['foreign_cores'], 2)} |"
        )
    lines += [
        "",
        "int8 = vision int8 + decoder int8 (MatMulNBits 8-bit); int4 = vision int8 + decoder int4.",
        "",
        "## Accuracy against FP32 (held-out volumes; gates: cosine >= 0.995, tokens >= 0.97, Dice >= 0.95)",
        "",
        "| graph | passed | cosine | token agreement | prefix | teacher-forced | Dice | size | in-report speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in r["calibration"]["variants"]:
        m, s = v["metrics"], v["speed"]
        sp = s.get("speedup") or s.get("decode_speedup")
        lines.append(
            f"| {v['graph']}.{v['precision']} | {v['passed']} | {f(m.get('embedding_cosine'), 4)} | "
            f"{f(m.get('token_agreement'))} | {f(m.get('prefix_agreement'))} | "
            f"{f(m.get('teacher_forced_agreement'))} | {f(m.get('mask_dice'))} | "
            f"{f(v['size_ratio'], 2)}x | {f(sp, 2)} |"
        )
    lines += ["", "## Kernels that ran (top ops by time, one profiled run, microseconds)", ""]
    for g, ops in r["kernels_us"].items():
        lines.append(f"- {g}: " + ", ".join(f"{k} {v / 1000:.0f} ms" for k, v in list(ops.items())[:6]))
    a = r["matmulnbits_accuracy_level"]
    lines += [
        "",
        "MatMulNBits int4 decode step (past 280): accuracy_level 0 "
        f"{f(a.get('int4_accuracy_level_0_step_ms'), 1)} ms vs accuracy_level 4 "
        f"{f(a.get('int4_accuracy_level_4_step_ms'), 1)} ms; FP32 {f(a.get('fp32_step_ms'), 1)} ms.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
