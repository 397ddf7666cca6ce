"""The bundle contract: the only thing that crosses from export to runtime (docs/architecture.md §3).

A bundle is a directory with ``manifest.json``, ``tokenizer.json``, the token embedding table and the ONNX
graphs. Each graph's inputs and outputs are declared once here (:func:`graph_specs`); the exporter derives
its ONNX input/output names and dynamic axes from that declaration and the runtime derives its bindings
from it, so the two cannot drift apart.

Two decoder graphs (schema 3), recorded in ``Manifest.decoders`` by backend:

* ``decoder`` (ONNX Runtime): the fused graph (GroupQueryAttention). Past and present keys/values of each
  layer are one buffer ``[batch, kv_heads, max_length, head_dim]`` that the runtime binds to both sides;
  the graph writes the new positions in place after the ``total - sequence`` valid ones (``total`` is the
  attention mask's width), so no step concatenates, copies or allocates the cache.
* ``decoder_std`` (TensorRT, optional): standard ONNX ops with the schema-2 contract: past
  ``[batch, kv_heads, past, head_dim]`` and explicit ``position_ids`` in, the whole cache
  ``[batch, kv_heads, past + sequence, head_dim]`` out (the TensorRT runtime ping-pongs two buffers).

Logits and the post-norm hidden state are returned for the last position only (all generation needs; it
saves the vocabulary projection of the whole prompt in prefill).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m3d_edge.bundle_files import check_paths, verify_files
from m3d_edge.bundle_files import sha256_file as sha256_file  # part of the bundle API its users import
from m3d_edge.errors import BundleError
from m3d_edge.fileio import atomic_write_text

SCHEMA_VERSION = 3  # 3: fused ORT decoder over a shared fixed-length cache + standard-op TensorRT decoder
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
EMBED_TABLE = "embed.npy"
KINDS = ("lamed", "retrieval")  # manifest "kind": M3D-LaMed (ask) or M3D-CLIP (embed and search)


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a graph: dtype (numpy name) and shape (ints, or names of dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphSpec:
    """The declaration of one exported graph."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input_dtype(self, name: str) -> str:
        """The declared dtype (numpy name) of input ``name``."""
        for t in self.inputs:
            if t.name == name:
                return t.dtype
        raise KeyError(f"{self.name} has no input {name!r}")

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}


@dataclass(frozen=True)
class ModelDims:
    """The sizes that shape every graph; stored in the manifest."""

    family: str  # "phi3" | "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    image_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    vision_hidden: int
    seg_hidden: int
    num_image_tokens: int

    @property
    def feature_grid(self) -> tuple[int, int, int]:
        return tuple(i // p for i, p in zip(self.image_size, self.patch_size, strict=True))  # type: ignore[return-value]

    @property
    def context_length(self) -> int:
        """The longest sequence the exported decoder computes exactly."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelDims:
        d = dict(d)
        for k in ("image_size", "patch_size"):
            d[k] = tuple(d[k])
        return cls(**d)


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) names of one decoder layer."""
    return (
        f"past_key_values.{layer}.key",
        f"past_key_values.{layer}.value",
        f"present.{layer}.key",
        f"present.{layer}.value",
    )


TENSORRT_DECODER = "decoder_std"  # the manifest entry of the standard-op decoder TensorRT builds from


def kv_dtype(precision: str) -> str:
    """The numpy name of the KV cache dtype of a fused decoder exported at ``precision``: float16 for
    fp16 (activations and cache in half precision, for GPUs), float32 otherwise (int8/int4 quantize the
    weights only)."""
    return "float16" if precision == "fp16" else "float32"


def decoder_spec(dims: ModelDims, standard: bool = False, cache: str = "float32") -> GraphSpec:
    """The fused decoder's declaration, or (``standard``) the standard-op one's (module docstring).

    ``cache`` is the dtype of the past/present tensors (:func:`kv_dtype`); the standard-op decoder's is
    always float32. Embeddings in and logits/hidden state out are float32 at every precision.
    """
    if standard:
        kv = ("batch", dims.num_kv_heads, "past", dims.head_dim)
        present = ("batch", dims.num_kv_heads, "total", dims.head_dim)
    else:
        kv = present = ("batch", dims.num_kv_heads, "max_length", dims.head_dim)
    dec_in = [
        TensorSpec("inputs_embeds", "float32", ("batch", "sequence", dims.hidden_size)),
        TensorSpec("attention_mask", "int64", ("batch", "total")),
    ]
    if standard:
        dec_in.append(TensorSpec("position_ids", "int64", ("batch", "sequence")))
    dec_out = [
        TensorSpec("logits", "float32", ("batch", dims.vocab_size)),
        TensorSpec("last_hidden_state", "float32", ("batch", dims.hidden_size)),
    ]
    for i in range(dims.num_layers):
        pk, pv, nk, nv = kv_names(i)
        dec_in += [TensorSpec(pk, cache, kv), TensorSpec(pv, cache, kv)]
        dec_out += [TensorSpec(nk, cache, present), TensorSpec(nv, cache, present)]
    return GraphSpec("decoder", tuple(dec_in), tuple(dec_out))


def graph_specs(dims: ModelDims, cache: str = "float32") -> dict[str, GraphSpec]:
    """Every graph the ONNX Runtime backend runs, declared once (docs/architecture.md §3); the decoder is
    the fused one, with a ``cache`` of that dtype (:func:`kv_dtype`)."""
    image = TensorSpec("image", "float32", ("batch", 1, *dims.image_size))
    grid = dims.feature_grid
    seg_embedding = TensorSpec("image_embedding", "float32", ("batch", dims.seg_hidden, *grid))
    specs = [
        GraphSpec(
            "vision",
            (image,),
            (TensorSpec("image_embeds", "float32", ("batch", dims.num_image_tokens, dims.hidden_size)),),
        ),
        decoder_spec(dims, cache=cache),
        GraphSpec("seg_encoder", (image,), (seg_embedding,)),
        GraphSpec(
            "seg_decoder",
            (seg_embedding, TensorSpec("seg_hidden", "float32", ("batch", dims.hidden_size))),
            (TensorSpec("mask_logits", "float32", ("batch", 1, *dims.image_size)),),
        ),
    ]
    return {s.name: s for s in specs}


@dataclass(frozen=True)
class ClipDims:
    """The sizes of an M3D-CLIP retrieval bundle (kind ``retrieval``); stored in the manifest."""

    family: str  # "m3d_clip"
    image_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    vocab_size: int
    max_position_embeddings: int  # the BERT position table: the longest text the graph takes
    max_text_len: int  # what the tokenizer truncates to (config max_text_len)
    embed_dim: int  # the shared embedding space (the projections' width)

    @property
    def context_length(self) -> int:
        """The longest text (in tokens) a query is truncated to."""
        return self.max_text_len

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipDims:
        d = dict(d)
        for k in ("image_size", "patch_size"):
            d[k] = tuple(d[k])
        return cls(**d)


def retrieval_graph_specs(dims: ClipDims) -> dict[str, GraphSpec]:
    """The two towers of a retrieval bundle; each returns L2-normalised token-0 embeddings."""
    ids = TensorSpec("input_ids", "int64", ("batch", "sequence"))
    mask = TensorSpec("attention_mask", "int64", ("batch", "sequence"))
    specs = [
        GraphSpec(
            "image_encoder",
            (TensorSpec("image", "float32", ("batch", 1, *dims.image_size)),),
            (TensorSpec("image_embeds", "float32", ("batch", dims.embed_dim)),),
        ),
        GraphSpec(
            "text_encoder", (ids, mask), (TensorSpec("text_embeds", "float32", ("batch", dims.embed_dim)),)
        ),
    ]
    return {s.name: s for s in specs}


@dataclass
class GraphEntry:
    """A graph as recorded in the manifest: its files, precision and hashes."""

    file: str
    precision: str = "fp32"
    sha256: dict[str, str] = field(default_factory=dict)  # every file of the graph (model + external data)
    opset: int | None = None
    ir_version: int | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)  # the declaration, for readers of the manifest
    outputs: list[dict[str, Any]] = field(default_factory=list)
    # other precisions: {name: {"file", "sha256": {file: hash}, "report", ...}}
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    default: str = "fp32"  # the precision the runtime runs unless told otherwise

    def resolve(self, precision: str | None = None) -> tuple[str, str]:
        """(file, precision) to run: ``precision`` if given, else the manifest's default."""
        want = precision or self.default
        if want == self.precision:
            return self.file, want
        if want not in self.variants:
            have = ", ".join([self.precision, *self.variants])
            raise BundleError(f"{self.file}: no {want} variant in this bundle (has {have})")
        return self.variants[want]["file"], want


@dataclass
class Manifest:
    """``manifest.json``: everything the runtime needs besides the graph files themselves."""

    bundle_id: str
    producer: str
    dims: ModelDims | ClipDims
    token_ids: dict[str, Any]  # im_patch, bx_start, bx_end, seg, bos, eos (list), pad
    prompt: dict[str, Any]  # image token string, count, splice start, add_bos
    preprocessing: dict[str, Any]
    generation: dict[str, Any]
    graphs: dict[str, GraphEntry]
    embed: dict[str, Any]  # file, sha256, shape
    tokenizer: dict[str, Any]  # file, sha256
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint name, config hash, model_type
    # which decoder graph each backend runs: {"onnxruntime": "decoder", "tensorrt": "decoder_std"};
    # "tensorrt" is absent when the bundle has no standard-op decoder (quantized-only exports)
    decoders: dict[str, str] = field(default_factory=lambda: {"onnxruntime": "decoder"})
    schema_version: int = SCHEMA_VERSION
    kind: str = "lamed"  # one of KINDS; "retrieval" bundles hold ClipDims and the two tower graphs

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        kind = d.get("kind", "lamed")
        if kind not in KINDS:
            raise ValueError(f"unknown bundle kind {kind!r} (expected one of {', '.join(KINDS)})")
        d["dims"] = (ClipDims if kind == "retrieval" else ModelDims).from_dict(d["dims"])
        d["graphs"] = {k: GraphEntry(**v) for k, v in d["graphs"].items()}
        return cls(**d)

    def specs(self) -> dict[str, GraphSpec]:
        if isinstance(self.dims, ClipDims):  # kind "retrieval" (from_dict picks the dims class by kind)
            return retrieval_graph_specs(self.dims)
        decoder = self.graphs.get("decoder")
        return graph_specs(self.dims, kv_dtype(decoder.precision) if decoder else "float32")

    def tensorrt_specs(self) -> dict[str, GraphSpec]:
        """The graphs TensorRT builds: the encoders and the standard-op decoder (under the name "decoder")."""
        specs = self.specs()
        if not isinstance(self.dims, ModelDims):
            raise BundleError(f"bundle {self.bundle_id}: a {self.kind} bundle has no decoder for TensorRT")
        return {**specs, "decoder": decoder_spec(self.dims, standard=True)}

    def tensorrt_entry(self, name: str) -> GraphEntry:
        """The manifest entry TensorRT builds graph ``name`` from; refuses a bundle without a standard decoder."""
        if name != "decoder":
            return self.graphs[name]
        std = self.decoders.get("tensorrt")
        if not std or std not in self.graphs:
            raise BundleError(
                f"bundle {self.bundle_id}: no standard-op decoder for TensorRT (it is written with fp32 exports;"
                " re-export with `m3d-edge export --precision fp32`)"
            )
        return self.graphs[std]


def io_declaration(tensors: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    """A graph's inputs or outputs as they are written into the manifest."""
    return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in tensors]


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST
    atomic_write_text(path, manifest.to_json() + "\n")
    return path


def read_manifest(bundle_dir: Path | str, verify: bool = True) -> Manifest:
    """Read and validate ``manifest.json``; with ``verify`` check every file's sha256.

    Raises :class:`BundleError` naming the bundle and the problem.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: not a bundle directory")
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST} (not an m3d-edge bundle)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"{path}: unreadable manifest ({type(e).__name__})") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema version {version!r} is not supported by this runtime (expects {SCHEMA_VERSION});"
            " re-export the bundle with this m3d-edge (`m3d-edge export CHECKPOINT -o BUNDLE`)"
        )
    try:
        manifest = Manifest.from_dict(raw)
        specs = dict(manifest.specs())
        if TENSORRT_DECODER in manifest.graphs:
            if not isinstance(manifest.dims, ModelDims):
                raise TypeError(f"a {manifest.kind} bundle has no decoder, yet lists {TENSORRT_DECODER!r}")
            specs[TENSORRT_DECODER] = decoder_spec(manifest.dims, standard=True)
    except (TypeError, KeyError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise BundleError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    for name, spec in specs.items():
        entry = manifest.graphs.get(name)
        if entry is None:
            raise BundleError(f"{path}: graph {name!r} is not listed")
        if (entry.inputs, entry.outputs) != (io_declaration(spec.inputs), io_declaration(spec.outputs)):
            raise BundleError(
                f"{path}: the inputs/outputs recorded for {name!r} differ from this runtime's contract"
            )
    check_paths(bundle_dir, manifest)
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


def _file_bytes(bundle_dir: Path, names: Any) -> int:
    return sum((bundle_dir / f).stat().st_size for f in names if f and (bundle_dir / f).is_file())


def _describe_graphs(bundle_dir: Path, manifest: Manifest) -> dict[str, dict[str, Any]]:
    graphs = {}
    for name, g in manifest.graphs.items():
        variants = {
            prec: {
                "file": v.get("file"),
                "bytes": _file_bytes(bundle_dir, v.get("sha256") or [v.get("file")]),
            }
            for prec, v in g.variants.items()
        }
        graphs[name] = {
            "file": g.file,
            "precision": g.precision,
            "default": g.default,
            "variants": variants,
            "bytes": _file_bytes(bundle_dir, g.sha256),
            "opset": g.opset,
        }
    return graphs


def _describe_calibration(bundle_dir: Path, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The calibration reports; ``verified`` says whether a variant's hash list vouches for one (a
    failed variant's report stays unlisted: shown, not vouched for). Symlinks out of the bundle are refused."""
    folder = bundle_dir / "calibration"
    hashed = {f for g in manifest.graphs.values() for v in g.variants.values() for f in v.get("sha256", {})}
    reports: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if not p.resolve().is_relative_to(bundle_dir.resolve()):
            reports[p.name] = {"error": "outside the bundle (refused)"}
            continue
        try:
            rep = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            rep = {"error": f"unreadable ({type(exc).__name__})"}
        rep = rep if isinstance(rep, dict) else {"value": rep}
        reports[p.name] = {**rep, "verified": f"calibration/{p.name}" in hashed}
    return reports


def describe(bundle_dir: Path | str) -> dict[str, Any]:
    """What a bundle holds, as plain data: identity, integrity (every sha256 checked, a failure is
    reported, not raised), dims, token ids, prompt and generation settings, graphs with their variants
    and sizes, and the calibration reports (``m3d-edge inspect BUNDLE --json``)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, verify=False)
    try:
        verify_files(bundle_dir, manifest)
        integrity = "ok (every sha256 matches)"
    except BundleError as exc:
        integrity = f"FAILED: {exc}"
    return {
        "bundle": str(bundle_dir),
        "bundle_id": manifest.bundle_id,
        "producer": manifest.producer,
        "schema_version": manifest.schema_version,
        "integrity": integrity,
        "total_bytes": sum(p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file()),
        "dims": {**asdict(manifest.dims), "context_length": manifest.dims.context_length},
        "token_ids": manifest.token_ids,
        "prompt": manifest.prompt,
        "generation": manifest.generation,
        "source": manifest.source,
        "graphs": _describe_graphs(bundle_dir, manifest),
        "calibration": _describe_calibration(bundle_dir, manifest),
    }
