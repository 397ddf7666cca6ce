"""INT8 for a retrieval (M3D-CLIP) bundle: the image encoder, gated on embedding cosine against FP32.

The same steps as :func:`m3d_edge.calibration.calibrate_bundle` for a LaMed vision graph: static S8S8
QDQ on the constant-weight MatMul/Gemm nodes only (:func:`quantize_encoder`), calibrated on
runtime-preprocessed studies, evaluated on held-out volumes, a JSON report under ``calibration/`` and a
manifest variant only when the worst held-out cosine passes :attr:`Gates.min_cosine` (or ``force``). The
text encoder stays FP32 (BERT over at most 128 tokens is cheap next to the 3D ViT).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from m3d_edge import __version__
from m3d_edge.bundle import read_manifest, sha256_file, write_manifest
from m3d_edge.calibration.calibrate import (
    CALIBRATION_DIR,
    CalibrationReport,
    Gates,
    VariantReport,
    _quiet,
    _rel,
)
from m3d_edge.calibration.data import load_calibration_data
from m3d_edge.calibration.evaluate import _speed, cosine, time_graph
from m3d_edge.calibration.quantize import file_bytes, io_names, quantize_encoder
from m3d_edge.errors import CalibrationError, M3DEdgeError
from m3d_edge.fileio import atomic_write_text
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
    entry = manifest.graphs[GRAPH]
    if entry.variants.pop("int8", None) is not None:  # unlist the old variant before replacing its files
        entry.default = entry.precision
        write_manifest(bundle, manifest)
    cal_dir = bundle / CALIBRATION_DIR
    cal_dir.mkdir(exist_ok=True)
    src, dst, cache = bundle / entry.file, bundle / f"{GRAPH}.int8.onnx", cal_dir / f"{GRAPH}.int8.cache.json"
    tick(f"quantize {GRAPH}.int8", 0, 2)
    try:
        with _quiet():
            settings = quantize_encoder(src, dst, data.calibration, method=method, cache_path=cache)
    except M3DEdgeError:
        raise
    except Exception as e:  # the quantizers raise assorted types
        raise CalibrationError(f"{src}: quantizing to int8 failed ({type(e).__name__}: {e})") from e
    if io_names(dst) != io_names(src):
        dst.unlink(missing_ok=True)
        raise CalibrationError(f"{dst}: the quantized graph's inputs/outputs differ from {src.name}")

    tick(f"evaluate {GRAPH}.int8", 1, 2)
    options = BackendOptions(threads=threads)
    spec = manifest.specs()[GRAPH]
    fp32, int8 = GraphSession(src, spec, options), GraphSession(dst, spec, options)
    ref = [fp32.run({"image": v})["image_embeds"] for v in data.held_out]
    got = [int8.run({"image": v})["image_embeds"] for v in data.held_out]
    cos = [cosine(a, b) for a, b in zip(ref, got, strict=True)]
    metrics = {
        "held_out_volumes": len(cos),
        "embedding_cosine": min(cos),
        "embedding_cosine_mean": float(np.mean(cos)),
    }
    speed = _speed(*time_graph([fp32, int8], {"image": data.held_out[0]}, speed_runs), "latency_s")
    checks = {
        "embedding_cosine": {
            "value": metrics["embedding_cosine"],
            "min": gates.min_cosine,
            "passed": metrics["embedding_cosine"] >= gates.min_cosine,
        }
    }
    passed = checks["embedding_cosine"]["passed"]
    keep = passed or force
    q_bytes, fp32_bytes = file_bytes([dst]), file_bytes([bundle / f for f in entry.sha256])
    rel_report = f"{CALIBRATION_DIR}/{GRAPH}.int8.json"
    doc = {
        "graph": GRAPH,
        "precision": "int8",
        "file": _rel(dst, bundle) if keep else None,
        "passed": passed,
        "forced": force and not passed,
        "gate": {"checks": checks, **asdict(gates)},
        "metrics": metrics,
        "speed": speed,
        "bytes": q_bytes,
        "bytes_fp32": fp32_bytes,
        "size_ratio": q_bytes / fp32_bytes if fp32_bytes else None,
        "quantization": settings,
        "calibration": {**data.summary(), "method": method},
        "producer": f"m3d-edge {__version__}",
        "onnxruntime": ort.__version__,
        "bundle_id": manifest.bundle_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(bundle / rel_report, json.dumps(doc, indent=2, sort_keys=True, default=float) + "\n")
    report = CalibrationReport(bundle=bundle, method=method, data=data.summary(), gates=gates)
    report.variants.append(
        VariantReport(
            graph=GRAPH,
            precision="int8",
            passed=passed,
            forced=force and not passed,
            kept=keep,
            default=passed,
            report=rel_report,
            checks=checks,
            metrics=metrics,
            speed=speed,
            bytes=q_bytes,
            bytes_fp32=fp32_bytes,
            file=_rel(dst, bundle) if keep else None,
        )
    )
    if keep:
        entry.variants["int8"] = {
            "file": _rel(dst, bundle),
            "sha256": {_rel(f, bundle): sha256_file(f) for f in (dst, bundle / rel_report, cache)},
            "report": rel_report,
            "gate": {"embedding_cosine": {"value": metrics["embedding_cosine"], "min": gates.min_cosine}},
            "passed": passed,
            "bytes": q_bytes,
            **({"forced": True} if force and not passed else {}),
        }
        if passed:
            entry.default = "int8"
    else:
        dst.unlink(missing_ok=True)
        cache.unlink(missing_ok=True)
    report.defaults = {name: e.default for name, e in manifest.graphs.items()}
    write_manifest(bundle, manifest)
    read_manifest(bundle, verify=True)
    tick("evaluate", 2, 2)
    report.seconds = time.perf_counter() - t_start
    return report
