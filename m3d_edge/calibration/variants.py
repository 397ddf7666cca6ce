"""What every calibration does for one variant: quantize it, gate it against FP32, write its report and
record it in the manifest (or delete it). :func:`~m3d_edge.calibration.calibrate.calibrate_bundle` (LaMed)
and :func:`~m3d_edge.calibration.retrieval.calibrate_retrieval` (M3D-CLIP) both run these steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from m3d_edge import __version__
from m3d_edge.bundle import Manifest, sha256_file, write_manifest
from m3d_edge.calibration.data import CalibrationData
from m3d_edge.calibration.quantize import file_bytes, io_names, quantize_decoder, quantize_encoder
from m3d_edge.errors import CalibrationError, M3DEdgeError
from m3d_edge.fileio import atomic_write_text

log = logging.getLogger(__name__)


CALIBRATION_DIR = "calibration"


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


def checks_for(graph: str, metrics: dict[str, Any], gates: Gates) -> dict[str, dict[str, Any]]:
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


def rel(path: Path, bundle: Path) -> str:
    return path.relative_to(bundle).as_posix()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ORT's quantizers print progress and root-logger warnings; keep them out of the user's terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


@dataclass
class Produced:
    """A quantized candidate on disk: its files (graph first), quantizer settings and calibration cache."""

    graph: str
    precision: str
    files: list[Path]
    settings: dict[str, Any]
    cache: Path | None


def unlist(bundle: Path, manifest: Manifest, jobs: list[tuple[str, str]]) -> None:
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


def quantize_variant(
    bundle: Path, manifest: Manifest, g: str, prec: str, data: CalibrationData, method: str, block_size: int
) -> Produced:
    src = bundle / manifest.graphs[g].file
    dst = bundle / f"{g}.{prec}.onnx"
    cache = None
    try:
        with quiet():
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
    return Produced(g, prec, files, settings, cache)


def variant_report(
    bundle: Path,
    manifest: Manifest,
    p: Produced,
    metrics: dict[str, Any],
    speed: dict[str, Any],
    gates: Gates,
    force: bool,
) -> VariantReport:
    checks = checks_for(p.graph, metrics, gates)
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
        file=rel(p.files[0], bundle) if keep else None,
    )


def write_report(
    bundle: Path,
    manifest: Manifest,
    vr: VariantReport,
    p: Produced,
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


def record(bundle: Path, manifest: Manifest, vr: VariantReport, p: Produced) -> None:
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
        "sha256": {rel(f, bundle): sha256_file(f) for f in hashed},
        "report": vr.report,
        "gate": {k: {"value": c["value"], "min": c["min"]} for k, c in vr.checks.items()},
        "passed": vr.passed,
        "bytes": vr.bytes,
    }
    if vr.forced:
        variant["forced"] = True
    entry.variants[vr.precision] = variant


def set_defaults(manifest: Manifest, report: CalibrationReport) -> None:
    """Encoders and decoder switch to int8 when it passed; int4 stays opt-in."""
    for vr in report.variants:
        if vr.precision == "int8" and vr.passed and vr.kept:
            manifest.graphs[vr.graph].default = "int8"
            vr.default = True
    report.defaults = {name: e.default for name, e in manifest.graphs.items()}
