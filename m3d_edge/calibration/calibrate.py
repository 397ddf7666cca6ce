"""``calibrate_bundle``: quantize a bundle's graphs, measure them against FP32, and gate what enters it.

For each graph and precision: quantize -> evaluate on held-out volumes -> write the report
``calibration/<graph>.<precision>.json`` -> apply the gate. A graph that passes (or is forced) is recorded in
the manifest as ``graphs[graph].variants[precision]`` with its files, report, gate and hashes (the report and
the calibration cache are hashed with the graph, so ``read_manifest(verify=True)`` checks them). A graph that
fails is deleted from disk and not listed (its report stays, unlisted, to say why).

Defaults (what the runtime runs unless told otherwise): an encoder switches to ``int8`` when it passed; the
decoder switches to ``int8`` when it passed; ``int4`` is never made the default (opt in with
``Pipeline.open(bundle, precision="int4")``): it drifts most and its gain is speed, a user's call. A forced
variant that failed its gate is listed (``passed: false, forced: true``) but never becomes a default.
The manifest is written once, at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from m3d_edge.bundle import Manifest, read_manifest, write_manifest
from m3d_edge.calibration.data import CalibrationData, load_calibration_data
from m3d_edge.calibration.variants import (
    CALIBRATION_DIR,
    CalibrationReport,
    Gates,
    Produced,
    quantize_variant,
    record,
    rel,
    set_defaults,
    unlist,
    variant_report,
    write_report,
)
from m3d_edge.choices import CALIBRATION_METHODS
from m3d_edge.errors import BundleError, CalibrationError
from m3d_edge.runtime.backend import BackendOptions

log = logging.getLogger(__name__)

# seg_decoder stays FP32: most of its time is the trilinear upsampling of the mask logits and small
# attention products, so INT8 would buy little there and add mask error (not implemented)
DEFAULT_GRAPHS = ("vision", "seg_encoder", "decoder")
Progress = Callable[[str, int, int], None]


def calibrate_bundle(
    bundle: Path | str,
    data_dir: Path | str,
    *,
    method: str = "minmax",
    samples: int = 8,
    held_out: int = 2,
    force: bool = False,
    weight_bits: tuple[int, ...] = (8, 4),
    block_size: int = 32,
    gates: Gates | None = None,
    progress: Progress | None = None,
    graphs: tuple[str, ...] = DEFAULT_GRAPHS,
    allow_augment: bool = True,
    threads: int = 0,
    speed_runs: int = 3,
) -> CalibrationReport:
    """Quantize ``graphs`` of ``bundle`` (encoders static INT8 QDQ, decoder weight-only ``weight_bits``),
    evaluate each against FP32 on held-out volumes from ``data_dir`` and record the passing ones.

    ``force`` keeps a variant that fails its gate (marked ``passed: false, forced: true``, never default).
    ``progress(stage, done, total)`` is called as work proceeds. Returns a :class:`CalibrationReport`.
    """
    t_start = time.perf_counter()
    bundle = Path(bundle)
    gates = gates or Gates()
    _check_settings(method, weight_bits)
    manifest = read_manifest(bundle, verify=True)
    if manifest.kind == "retrieval":  # M3D-CLIP: INT8 image encoder, gated on embedding cosine
        from m3d_edge.calibration.retrieval import calibrate_retrieval

        kw = {"method": method, "samples": samples, "held_out": held_out, "force": force, "gates": gates}
        kw.update(progress=progress, allow_augment=allow_augment, threads=threads, speed_runs=speed_runs)
        return calibrate_retrieval(bundle, data_dir, **kw)
    graphs = _graphs_to_calibrate(bundle, manifest, graphs)

    def tick(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)

    data = load_calibration_data(data_dir, samples, held_out, allow_augment=allow_augment, progress=tick)
    (bundle / CALIBRATION_DIR).mkdir(exist_ok=True)
    jobs = [
        (g, prec)
        for g in graphs
        for prec in (_weight_precisions(weight_bits) if g == "decoder" else ["int8"])
    ]
    unlist(bundle, manifest, jobs)
    produced = _quantize_all(bundle, manifest, jobs, data, method, block_size, tick)

    # evaluate every candidate against the FP32 reference (the manifest lists them only in memory)
    for (g, prec), p in produced.items():
        manifest.graphs[g].variants[prec] = {"file": rel(p.files[0], bundle)}
    from m3d_edge.calibration.evaluate import Reference, evaluate_variant

    options = BackendOptions(threads=threads)
    tick("evaluate fp32 reference", 0, len(jobs) + 1)
    ref = Reference(bundle, manifest, data.held_out, options)
    report = CalibrationReport(bundle=bundle, method=method, data=data.summary(), gates=gates)
    for k, (g, prec) in enumerate(jobs):
        tick(f"evaluate {g}.{prec}", k + 1, len(jobs) + 1)
        metrics, speed = evaluate_variant(bundle, manifest, g, prec, ref, options, speed_runs=speed_runs)
        vr = variant_report(bundle, manifest, produced[(g, prec)], metrics, speed, gates, force)
        write_report(bundle, manifest, vr, produced[(g, prec)], report.data, method, gates)
        record(bundle, manifest, vr, produced[(g, prec)])
        report.variants.append(vr)
    tick("evaluate", len(jobs) + 1, len(jobs) + 1)
    set_defaults(manifest, report)
    write_manifest(bundle, manifest)
    try:
        read_manifest(bundle, verify=True)
    except BundleError as e:  # should never happen: we hashed what we wrote
        raise CalibrationError(f"{bundle}: manifest does not verify after calibration ({e})") from e
    report.seconds = time.perf_counter() - t_start
    return report


def _weight_precisions(weight_bits: tuple[int, ...]) -> list[str]:
    return [f"int{b}" for b in weight_bits]


def _check_settings(method: str, weight_bits: tuple[int, ...]) -> None:
    if method not in CALIBRATION_METHODS:
        raise CalibrationError(
            f"unknown calibration method {method!r} (choose from {', '.join(CALIBRATION_METHODS)})"
        )
    bad = [b for b in weight_bits if b not in (4, 8)]
    if bad:
        raise CalibrationError(f"decoder weight bits must be 4 or 8 (got {bad})")


def _graphs_to_calibrate(bundle: Path, manifest: Manifest, graphs: tuple[str, ...]) -> tuple[str, ...]:
    """``graphs`` less a decoder quantized at export; refuses unknown graphs and the mask decoder."""
    if "decoder" in graphs and manifest.graphs["decoder"].precision != "fp32":
        # quantized at export (m3d-edge export --precision int4|int8): there is no FP32 decoder to quantize
        # or to measure against; the encoders are still calibrated
        log.warning(
            "decoder: exported at %s, not recalibrated (export with --precision fp32 to gate int8/int4 variants)",
            manifest.graphs["decoder"].precision,
        )
        graphs = tuple(g for g in graphs if g != "decoder")
    unknown = [g for g in graphs if g not in manifest.graphs]
    if "seg_decoder" in graphs:
        raise CalibrationError(
            "seg_decoder: INT8 calibration of the mask decoder is not supported (it stays FP32; its cost is"
            " the mask upsampling, which INT8 does not speed up)"
        )
    if unknown:
        raise CalibrationError(
            f"{bundle}: no graph named {', '.join(unknown)} (has {', '.join(manifest.graphs)})"
        )
    return graphs


def _quantize_all(
    bundle: Path,
    manifest: Manifest,
    jobs: list[tuple[str, str]],
    data: CalibrationData,
    method: str,
    block_size: int,
    tick: Progress,
) -> dict[tuple[str, str], Produced]:
    produced = {}
    for k, (g, prec) in enumerate(jobs):
        tick(f"quantize {g}.{prec}", k, len(jobs))
        produced[(g, prec)] = quantize_variant(bundle, manifest, g, prec, data, method, block_size)
    tick("quantize", len(jobs), len(jobs))
    return produced
