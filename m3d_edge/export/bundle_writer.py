"""The steps both exporters share (the M3D-LaMed bundle of :mod:`~m3d_edge.export.exporter`, the M3D-CLIP
retrieval bundle of :mod:`~m3d_edge.export.clip`): tracing a graph to ONNX, recording each graph's files,
hashes and timing as it is written, the preprocessing block, the bundle id, and the manifest written last.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m3d_edge.bundle import (
    MANIFEST,
    GraphEntry,
    GraphSpec,
    Manifest,
    io_declaration,
    sha256_file,
    write_manifest,
)
from m3d_edge.errors import ExportError
from m3d_edge.export.onnx_store import IR_VERSION, OPSET
from m3d_edge.fileio import atomic_path

MAX_IR_VERSION = IR_VERSION  # traced graphs are capped at the hand-written graphs' IR
EXTERNAL_DATA_BYTES = 1 << 30  # graphs larger than this keep their weights in a side file

Progress = Callable[[str, str], None]  # (graph name, event) where event is "start" | "done"


@dataclass
class GraphReport:
    name: str
    seconds: float
    bytes: int
    max_abs_diff: float | None = None


@dataclass
class ExportReport:
    bundle: Path
    graphs: list[GraphReport] = field(default_factory=list)
    seconds: float = 0.0


def export_graph(module: torch.nn.Module, spec: GraphSpec, args: tuple[Any, ...], path: Path) -> None:
    """Trace one graph, cap its IR version and save it (weights as external data when large)."""
    import onnx

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmpdir:
        tmp = Path(tmpdir) / path.name  # torch writes the weights of >2 GB graphs beside it
        # no_grad: the TorchScript tracer otherwise records autograd state and keeps every activation of
        # the example pass alive (about 9 GB for the two ViT-B encoders at batch 2)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=spec.input_names(),
                output_names=spec.output_names(),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=OPSET,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    large = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    data_name = f"{path.name}.data"
    (path.parent / data_name).unlink(missing_ok=True)
    with atomic_path(path) as out:
        onnx.save(
            proto, str(out), save_as_external_data=large, all_tensors_to_one_file=True, location=data_name
        )
    onnx.checker.check_model(str(path))


def graph_files(bundle: Path, spec: GraphSpec) -> list[str]:
    """The graph's file and, when it has one, its external-data file."""
    files = [spec.file]
    if (bundle / f"{spec.file}.data").is_file():
        files.append(f"{spec.file}.data")
    return files


def bundle_id(family: str, manifest_files: dict[str, dict[str, str]]) -> str:
    h = hashlib.sha256(json.dumps(manifest_files, sort_keys=True).encode()).hexdigest()
    return f"m3d-{family}-{h[:12]}"


def preprocessing(image_size: tuple[int, ...]) -> dict[str, Any]:
    """The manifest's preprocessing block: M3D's min-max, foreground crop and trilinear resize."""
    return {
        "image_size": list(image_size),
        "intensity": "minmax",
        "crop_foreground": True,
        "resize": "trilinear",
        "align_corners": False,
    }


def refuse_existing(out: Path, overwrite: bool) -> None:
    if (out / MANIFEST).exists() and not overwrite:
        raise ExportError(f"{out}: already holds a bundle (pass --overwrite to replace it)")


class BundleWriter:
    """An export in progress: ``out`` without a manifest, the graph entries and the report so far."""

    def __init__(self, out: Path, progress: Progress | None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        self.out, self.progress = out, progress
        self.report = ExportReport(bundle=out)
        self.graphs: dict[str, GraphEntry] = {}
        self._hashes: dict[Path, str] = {}

    def begin(self, name: str) -> float:
        """Announce a graph; returns its start time for :meth:`record`."""
        if self.progress:
            self.progress(name, "start")
        return time.perf_counter()

    def sha256(self, file: str) -> str:
        """The hash of a bundle file, computed once (graphs may share a weight file)."""
        path = self.out / file
        if path not in self._hashes:
            self._hashes[path] = sha256_file(path)
        return self._hashes[path]

    def record(
        self,
        name: str,
        spec: GraphSpec,
        files: list[str],
        t0: float,
        diff: float | None,
        precision: str = "fp32",
    ) -> None:
        """A written (and checked) graph: its manifest entry, its line of the report."""
        self.graphs[name] = GraphEntry(
            file=files[0],
            precision=precision,
            default=precision,
            sha256={f: self.sha256(f) for f in files},
            opset=OPSET,
            ir_version=MAX_IR_VERSION,
            inputs=io_declaration(spec.inputs),
            outputs=io_declaration(spec.outputs),
        )
        size = sum((self.out / f).stat().st_size for f in files)
        self.report.graphs.append(GraphReport(name, time.perf_counter() - t0, size, diff))
        if self.progress:
            self.progress(name, "done")

    def graph_hashes(self) -> dict[str, dict[str, str]]:
        return {name: g.sha256 for name, g in self.graphs.items()}

    def finish(self, manifest: Manifest, start: float) -> ExportReport:
        """Write the manifest, last: a bundle without one is an unfinished export."""
        write_manifest(self.out, manifest)
        self.report.seconds = time.perf_counter() - start
        return self.report
