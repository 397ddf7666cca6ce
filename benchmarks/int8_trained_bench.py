"""INT8/INT4 gates with the default thresholds on a *trained* bench-size model (issue 6).

    python benchmarks/int8_trained_bench.py [--work /tmp/m3d-trained-bench] [--steps 60]

Writes the bench preset (real ViT-B encoders, 1024x8 decoder) with its decoder taught fixed answers to the
task prompts (m3d_edge.export.teach), exports it, calibrates it on synthetic CT-like volumes with the
default gates and saves the calibration summary to benchmarks/results/int8_trained_bench.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_rss_mb, save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/m3d-trained-bench"))
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    from m3d_edge.calibration import calibrate_bundle
    from m3d_edge.export.exporter import export_bundle
    from m3d_edge.export.tiny import write_tiny_checkpoint
    from m3d_edge.runtime.imaging.phantom import ct_like_volume

    result: dict = {"machine": machine(), "steps": args.steps}
    t0 = time.perf_counter()
    losses: list[float] = []

    def progress(step: int, loss: float) -> None:
        losses.append(loss)
        print(f"step {step} loss {loss:.4f} {time.perf_counter() - t0:.0f}s", flush=True)

    ckpt = write_tiny_checkpoint(
        args.work / "ckpt", "phi3", preset="bench", trained=True, teach_steps=args.steps, progress=progress
    )
    result["teach_s"], result["final_loss"] = time.perf_counter() - t0, losses[-1]
    t1 = time.perf_counter()
    bundle = export_bundle(ckpt, args.work / "bundle", overwrite=True).bundle
    result["export_s"] = time.perf_counter() - t1
    data = args.work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for s in range(4):
        np.save(data / f"study{s}.npy", ct_like_volume(40 + s))
    t2 = time.perf_counter()
    report = calibrate_bundle(bundle, data, samples=2, held_out=2, speed_runs=3, threads=2)
    result["calibrate_s"] = time.perf_counter() - t2
    result["passed"] = report.passed
    result["report"] = report.to_dict()
    result["summary"] = report.summary()
    result["peak_rss_mb"] = peak_rss_mb()
    print(report.summary())
    print("saved", save("int8_trained_bench", result))


if __name__ == "__main__":
    main()
