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

import contextlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from m3d_edge import __version__
from m3d_edge.bundle import Manifest, read_manifest, sha256_file, write_manifest
from m3d_edge.calibration.data import CalibrationData, load_calibration_data
from m3d_edge.calibration.quantize import (
    file_bytes,
    io_names,
    quantize_decoder,
    quantize_encoder,
)
from m3d_edge.choices import CALIBRATION_METHODS
from m3d_edge.errors import BundleError, CalibrationError, M3DEdgeError
from m3d_edge.fileio import atomic_write_text
from m3d_edge.runtime.backend import BackendOptions

log = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"
# seg_decoder stays FP32: most of its time is the trilinear upsampling of the mask logits and small
# attention products, so INT8 would buy little there and add mask error (not implemented)
DEFAULT_GRAPHS = ("vision", "seg_encoder", "decoder")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Gates:
    """Minimum accuracy against FP32 on the held-out volumes for a quantized graph to enter the bundle."""

    min_cosine: float = 0.995  # image / SegVol embedding cosine (worst held-out volume)
    min_token_agreement: float = 0.97  # position-wise greedy token agreement over the prompt suite
    min_dice: float = 0.95  # mask Dice against the FP32 masks (worst segment prompt)


@dataclass
class VariantReport:
    """The outcome for one graph at one precision."""

    graph: str
    precision: str
    passed: bool
    forced: bool
    kept: bool  # in the bundle and the manifest
    default: bool  # the precision the runtime now runs for this graph
    report: str  # bundle-relative path of the JSON report
    checks: dict[str, dict[str, Any]]
    metrics: dict[str, Any]
    speed: dict[str, Any]
    bytes: int
    bytes_fp32: int
    file: str | None = None


@dataclass
class CalibrationReport:
    """What ``calibrate_bundle`` did: one :class:`VariantReport` per quantized graph and precision."""

    bundle: Path
    method: str
    data: dict[str, Any]
    gates: Gates
    variants: list[VariantReport] = field(default_factory=list)
    defaults: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.variants)

    def variant(self, graph: str, precision: str) -> VariantReport:
        for v in self.variants:
            if (v.graph, v.precision) == (graph, precision):
                return v
        raise KeyError(f"{graph}.{precision}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bundle"] = str(self.bundle)
        return d

    def summary(self) -> str:
        lines = [f"{self.bundle}: calibrated with {self.method} in {self.seconds:.0f} s"]
        for note in self.data.get("notes", []):
            lines.append(f"  note: {note}")
        for v in self.variants:
            state = "passed" if v.passed else ("FAILED, forced in" if v.forced else "FAILED, removed")
            figs = ", ".join(f"{k} {c['value']:.4f} (>= {c['min']})" for k, c in v.checks.items())
            size = f"{v.bytes / max(v.bytes_fp32, 1):.2f}x size"
            lines.append(
                f"  {v.graph}.{v.precision}: {state}; {figs}; {size}{' [default]' if v.default else ''}"
            )
        return "\n".join(lines)


def _checks(graph: str, metrics: dict[str, Any], gates: Gates) -> dict[str, dict[str, Any]]:
    """The gate of each metric that applies to ``graph`` (M3D-CLIP's image_encoder: cosine only)."""
    rows = []
    if graph in ("vision", "seg_encoder", "image_encoder"):
        rows.append(("embedding_cosine", gates.min_cosine))
    if graph in ("vision", "decoder"):
        rows.append(("token_agreement", gates.min_token_agreement))
    if graph != "image_encoder":
        rows.append(("mask_dice", gates.min_dice))
    out = {}
    for key, minimum in rows:
        value = metrics.get(key)
        out[key] = {"value": value, "min": minimum, "passed": value is not None and value >= minimum}
    return out


def _rel(path: Path, bundle: Path) -> str:
    return path.relative_to(bundle).as_posix()


@contextlib.contextmanager
def _quiet():
    """ORT's quantizers print progress and root-logger warnings; keep them out of the user's terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


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
    _unlist(bundle, manifest, jobs)
    produced = _quantize_all(bundle, manifest, jobs, data, method, block_size, tick)

    # evaluate every candidate against the FP32 reference (the manifest lists them only in memory)
    for (g, prec), p in produced.items():
        manifest.graphs[g].variants[prec] = {"file": _rel(p.files[0], bundle)}
    from m3d_edge.calibration.evaluate import Reference, evaluate_variant

    options = BackendOptions(threads=threads)
    tick("evaluate fp32 reference", 0, len(jobs) + 1)
    ref = Reference(bundle, manifest, data.held_out, options)
    report = CalibrationReport(bundle=bundle, method=method, data=data.summary(), gates=gates)
    for k, (g, prec) in enumerate(jobs):
        tick(f"evaluate {g}.{prec}", k + 1, len(jobs) + 1)
        metrics, speed = evaluate_variant(bundle, manifest, g, prec, ref, options, speed_runs=speed_runs)
        vr = _variant_report(bundle, manifest, produced[(g, prec)], metrics, speed, gates, force)
        _write_report(bundle, manifest, vr, produced[(g, prec)], report.data, method, gates)
        _record(bundle, manifest, vr, produced[(g, prec)])
        report.variants.append(vr)
    tick("evaluate", len(jobs) + 1, len(jobs) + 1)
    _set_defaults(manifest, report)
    write_manifest(bundle, manifest)
    try:
        read_manifest(bundle, verify=True)
    except BundleError as e:  # should never happen: we hashed what we wrote
        raise CalibrationError(f"{bundle}: manifest does not verify after calibration ({e})") from e
    report.seconds = time.perf_counter() - t_start
    return report


@dataclass
class _Produced:
    """A quantized candidate on disk: its files (graph first), quantizer settings and calibration cache."""

    graph: str
    precision: str
    files: list[Path]
    settings: dict[str, Any]
    cache: Path | None


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


def _unlist(bundle: Path, manifest: Manifest, jobs: list[tuple[str, str]]) -> None:
    """Unlist earlier variants of the graphs we redo before their files are replaced, so the bundle on disk
    stays consistent (FP32 for those graphs) if calibration stops half way."""
    dropped = False
    for g, prec in jobs:
        old = manifest.graphs[g].variants.pop(prec, None)
        dropped = dropped or old is not None
        if old and manifest.graphs[g].default == prec:
            manifest.graphs[g].default = manifest.graphs[g].precision
    if dropped:
        write_manifest(bundle, manifest)


def _quantize_all(
    bundle: Path,
    manifest: Manifest,
    jobs: list[tuple[str, str]],
    data: CalibrationData,
    method: str,
    block_size: int,
    tick: Progress,
) -> dict[tuple[str, str], _Produced]:
    produced = {}
    for k, (g, prec) in enumerate(jobs):
        tick(f"quantize {g}.{prec}", k, len(jobs))
        produced[(g, prec)] = _quantize(bundle, manifest, g, prec, data, method, block_size)
    tick("quantize", len(jobs), len(jobs))
    return produced


def _quantize(
    bundle: Path, manifest: Manifest, g: str, prec: str, data: CalibrationData, method: str, block_size: int
) -> _Produced:
    src = bundle / manifest.graphs[g].file
    dst = bundle / f"{g}.{prec}.onnx"
    cache = None
    try:
        with _quiet():
            if g == "decoder":
                settings = quantize_decoder(src, dst, bits=int(prec[3:]), block_size=block_size)
            else:
                cache = bundle / CALIBRATION_DIR / f"{g}.{prec}.cache.json"
                settings = quantize_encoder(
                    src, dst, data.calibration, method=method, input_name="image", cache_path=cache
                )
    except M3DEdgeError:
        raise
    except Exception as e:  # the quantizers raise assorted types
        raise CalibrationError(f"{src}: quantizing to {prec} failed ({type(e).__name__}: {e})") from e
    if io_names(dst) != io_names(src):
        dst.unlink(missing_ok=True)
        raise CalibrationError(f"{dst}: the quantized graph's inputs/outputs differ from {src.name}")
    data_file = dst.with_name(dst.name + ".data")
    files = [dst, data_file] if data_file.exists() else [dst]
    return _Produced(g, prec, files, settings, cache)


def _variant_report(
    bundle: Path,
    manifest: Manifest,
    p: _Produced,
    metrics: dict[str, Any],
    speed: dict[str, Any],
    gates: Gates,
    force: bool,
) -> VariantReport:
    checks = _checks(p.graph, metrics, gates)
    passed = all(c["passed"] for c in checks.values())
    keep = passed or force
    return VariantReport(
        graph=p.graph,
        precision=p.precision,
        passed=passed,
        forced=force and not passed,
        kept=keep,
        default=False,
        report=f"{CALIBRATION_DIR}/{p.graph}.{p.precision}.json",
        checks=checks,
        metrics=metrics,
        speed=speed,
        bytes=file_bytes(p.files),
        bytes_fp32=file_bytes([bundle / f for f in manifest.graphs[p.graph].sha256]),
        file=_rel(p.files[0], bundle) if keep else None,
    )


def _write_report(
    bundle: Path,
    manifest: Manifest,
    vr: VariantReport,
    p: _Produced,
    data: dict[str, Any],
    method: str,
    gates: Gates,
) -> None:
    """``calibration/<graph>.<precision>.json``: the variant's record, its gate, quantizer and provenance."""
    doc = {
        "graph": vr.graph,
        "precision": vr.precision,
        "file": vr.file,
        "passed": vr.passed,
        "forced": vr.forced,
        "gate": {"checks": vr.checks, **asdict(gates)},
        "metrics": vr.metrics,
        "speed": vr.speed,
        "bytes": vr.bytes,
        "bytes_fp32": vr.bytes_fp32,
        "size_ratio": vr.bytes / vr.bytes_fp32 if vr.bytes_fp32 else None,
        "quantization": p.settings,
        "calibration": {**data, "method": method},
        "producer": f"m3d-edge {__version__}",
        "onnxruntime": ort.__version__,
        "bundle_id": manifest.bundle_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(bundle / vr.report, json.dumps(doc, indent=2, sort_keys=True, default=float) + "\n")


def _record(bundle: Path, manifest: Manifest, vr: VariantReport, p: _Produced) -> None:
    """List a kept variant in the manifest with its hashes; delete a rejected one's files."""
    entry = manifest.graphs[vr.graph]
    if not vr.kept:
        entry.variants.pop(vr.precision, None)
        for f in [*p.files, *([p.cache] if p.cache else [])]:
            f.unlink(missing_ok=True)
        log.warning("%s.%s failed its gate and was removed: %s", vr.graph, vr.precision, vr.checks)
        return
    hashed = [*p.files, bundle / vr.report, *([p.cache] if p.cache else [])]
    variant: dict[str, Any] = {
        "file": vr.file,
        "sha256": {_rel(f, bundle): sha256_file(f) for f in hashed},
        "report": vr.report,
        "gate": {k: {"value": c["value"], "min": c["min"]} for k, c in vr.checks.items()},
        "passed": vr.passed,
        "bytes": vr.bytes,
    }
    if vr.forced:
        variant["forced"] = True
    entry.variants[vr.precision] = variant


def _set_defaults(manifest: Manifest, report: CalibrationReport) -> None:
    """Encoders and decoder switch to int8 when it passed; int4 stays opt-in."""
    for vr in report.variants:
        if vr.precision == "int8" and vr.passed and vr.kept:
            manifest.graphs[vr.graph].default = "int8"
            vr.default = True
    report.defaults = {name: e.default for name, e in manifest.graphs.items()}
