"""Export time and peak memory of a bench-size model (docs/architecture.md §8 "bench"); issue 2's benchmark.

    python benchmarks/export_bench.py [--preset bench] [--work /tmp/m3d-bench]

Writes a random-weight checkpoint of the preset (real ViT-B vision tower and SegVol encoder, a 1024x8
Phi-3-shaped decoder), exports it with validation, and records wall time per graph and the peak RSS of
the export process in benchmarks/results/export_<preset>.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Noise, machine, peak_rss_mb, save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--work", default="/tmp/m3d-bench")
    ap.add_argument("--child", choices=["checkpoint", "export"])
    args = ap.parse_args()
    work = Path(args.work)
    ckpt, bundle = work / f"ckpt-{args.preset}", work / f"bundle-{args.preset}"
    if args.child == "checkpoint":
        from m3d_edge.export.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(ckpt, "phi3", preset=args.preset)
        print(f"RSS {peak_rss_mb():.0f}")
        return
    if args.child == "export":
        from m3d_edge.export.exporter import export_bundle

        t0 = time.perf_counter()
        report = export_bundle(ckpt, bundle, overwrite=True)
        for g in report.graphs:
            print(f"GRAPH {g.name} {g.seconds:.2f} {g.bytes} {g.max_abs_diff}")
        print(f"TOTAL {time.perf_counter() - t0:.2f}")
        print(f"RSS {peak_rss_mb():.0f}")
        return
    results: dict = {"preset": args.preset, "machine": machine()}
    for step in ("checkpoint", "export"):
        t0 = time.perf_counter()
        with Noise() as noise:
            out = subprocess.run(
                [sys.executable, __file__, "--preset", args.preset, "--work", str(work), "--child", step],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        entry: dict = {"wall_s": round(time.perf_counter() - t0, 2), "machine_load": round(noise.load, 2)}
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "RSS":
                entry["peak_rss_mb"] = float(parts[1])
            elif parts and parts[0] == "GRAPH":
                entry.setdefault("graphs", {})[parts[1]] = {
                    "seconds": float(parts[2]),
                    "bytes": int(parts[3]),
                    "max_abs_diff": float(parts[4]),
                }
        results[step] = entry
        print(step, entry)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    results["checkpoint_bytes"] = size
    print("saved", save(f"export_{args.preset}", results))


if __name__ == "__main__":
    main()
