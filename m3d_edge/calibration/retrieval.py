"""INT8 for a retrieval (M3D-CLIP) bundle: the image encoder, gated on embedding cosine against FP32.

The same steps as :func:`m3d_edge.calibration.calibrate_bundle` for a LaMed vision graph: static S8S8
QDQ on the constant-weight MatMul/Gemm nodes only (:func:`quantize_encoder`), calibrated on
runtime-preprocessed studies, evaluated on held-out volumes, a JSON report under ``calibration/`` and a
manifest variant only when the worst held-out cosine passes :attr:`Gates.min_cosine` (or ``force``). The
text encoder stays FP32 (BERT over at most 128 tokens is cheap next to the 3D ViT).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.bundle import Manifest, read_manifest, write_manifest
from m3d_edge.calibration.data import load_calibration_data
from m3d_edge.calibration.evaluate import _speed, cosine, time_graph
from m3d_edge.calibration.variants import (
    CALIBRATION_DIR,
    CalibrationReport,
    Gates,
    quantize_variant,
    record,
    set_defaults,
    unlist,
    variant_report,
    write_report,
)
from m3d_edge.runtime.backend import BackendOptions, GraphSession

GRAPH = "image_encoder"


def calibrate_retrieval(
    bundle: Path | str,
    data_dir: Path | str,
    *,
    method: str = "minmax",
    samples: int = 8,
    held_out: int = 2,
    force: bool = False,
    gates: Gates | None = None,
    progress=None,
    allow_augment: bool = True,
    threads: int = 0,
    speed_runs: int = 3,
    **_ignored,
) -> CalibrationReport:
    """Quantize the image encoder of a retrieval bundle to INT8 and record it when it passes its gate."""
    t_start = time.perf_counter()
    bundle, gates = Path(bundle), gates or Gates()
    manifest = read_manifest(bundle, verify=True)

    def tick(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)

    data = load_calibration_data(data_dir, samples, held_out, allow_augment=allow_augment, progress=tick)
    jobs = [(GRAPH, "int8")]
    unlist(bundle, manifest, jobs)
    (bundle / CALIBRATION_DIR).mkdir(exist_ok=True)
    tick(f"quantize {GRAPH}.int8", 0, 2)
    produced = quantize_variant(bundle, manifest, GRAPH, "int8", data, method, block_size=0)

    tick(f"evaluate {GRAPH}.int8", 1, 2)
    metrics, speed = _evaluate(bundle, manifest, produced.files[0], data.held_out, threads, speed_runs)
    report = CalibrationReport(bundle=bundle, method=method, data=data.summary(), gates=gates)
    vr = variant_report(bundle, manifest, produced, metrics, speed, gates, force)
    write_report(bundle, manifest, vr, produced, report.data, method, gates)
    record(bundle, manifest, vr, produced)
    report.variants.append(vr)
    set_defaults(manifest, report)
    write_manifest(bundle, manifest)
    read_manifest(bundle, verify=True)
    tick("evaluate", 2, 2)
    report.seconds = time.perf_counter() - t_start
    return report


def _evaluate(
    bundle: Path, manifest: Manifest, dst: Path, held_out: list[np.ndarray], threads: int, speed_runs: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Worst and mean cosine of the INT8 image embeddings against FP32 on the held-out volumes, and speed."""
    options = BackendOptions(threads=threads)
    spec = manifest.specs()[GRAPH]
    fp32 = GraphSession(bundle / manifest.graphs[GRAPH].file, spec, options)
    int8 = GraphSession(dst, spec, options)
    ref = [fp32.run({"image": v})["image_embeds"] for v in held_out]
    got = [int8.run({"image": v})["image_embeds"] for v in held_out]
    cos = [cosine(a, b) for a, b in zip(ref, got, strict=True)]
    metrics = {
        "held_out_volumes": len(cos),
        "embedding_cosine": min(cos),
        "embedding_cosine_mean": float(np.mean(cos)),
    }
    speed = _speed(*time_graph([fp32, int8], {"image": held_out[0]}, speed_runs), "latency_s")
    return metrics, speed
