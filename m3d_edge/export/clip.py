"""M3D-CLIP: read a released checkpoint folder, rebuild it in torch, export a retrieval bundle.

The released model (``LaMed/src/model/CLIP.py``) is the 3D ViT with its cls token (``vision_encoder.*``),
a BERT text encoder (``language_encoder.*``) built by ``BertModel.from_pretrained`` on a hub name, two
projections ``mm_vision_proj`` / ``mm_language_proj`` and ``logit_scale``. An embedding is the
L2-normalised projection of token 0 of each tower; similarity is their dot product.

``config.json`` names the BERT by path only, so its sizes are inferred from the tensors (heads 64 wide,
as in bert-base); nothing is fetched. The bundle (kind ``retrieval``) holds ``image_encoder.onnx``,
``text_encoder.onnx``, a WordPiece ``tokenizer.json`` converted with ``tokenizers`` and the manifest.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from m3d_edge import __version__
from m3d_edge.bundle import TOKENIZER, ClipDims, Manifest, retrieval_graph_specs, sha256_file
from m3d_edge.errors import ExportError
from m3d_edge.export.bundle_writer import (
    BundleWriter,
    ExportReport,
    Progress,
    bundle_id,
    export_graph,
    graph_files,
    preprocessing,
    refuse_existing,
)
from m3d_edge.export.checkpoint import check_keys, load_state_dict
from m3d_edge.export.side_files import read_json
from m3d_edge.export.vit import ViT3D
from m3d_edge.fileio import atomic_path

MODEL_TYPE = "m3d_clip"
HEAD_DIM = 64  # bert-base: 768 = 12 heads x 64
MIN_COSINE = 0.99999  # each exported tower against torch, worst row
TEXT = "language_encoder."
_LAYER = re.compile(r"^language_encoder\.encoder\.layer\.(\d+)\.")
# buffers older transformers saved with the weights; recomputed by BertModel
_IGNORED = ("language_encoder.embeddings.position_ids",)


@dataclass(frozen=True)
class ClipConfig:
    """The parts of an M3D-CLIP ``config.json`` that shape the vision tower (names of ``M3DCLIPConfig``)."""

    raw: dict[str, Any]

    @property
    def image_size(self) -> tuple[int, int, int]:
        return tuple(self.raw.get("img_size", (32, 256, 256)))  # type: ignore[return-value]

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.raw.get("patch_size", (4, 16, 16)))  # type: ignore[return-value]

    @property
    def vit(self) -> dict[str, int]:
        r = self.raw
        return {
            "hidden": int(r.get("hidden_size", 768)),
            "mlp_dim": int(r.get("mlp_dim", 3072)),
            "layers": int(r.get("num_layers", 12)),
            "heads": int(r.get("num_heads", 12)),
        }

    @property
    def max_text_len(self) -> int:
        return int(self.raw.get("max_text_len", 128))


def is_clip_checkpoint(ckpt: Path | str) -> bool:
    path = Path(ckpt) / "config.json"
    return path.is_file() and read_json(path).get("model_type") == MODEL_TYPE


def read_clip_config(ckpt: Path | str) -> ClipConfig:
    raw = read_json(Path(ckpt) / "config.json")
    if raw.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{ckpt}/config.json: model_type {raw.get('model_type')!r} is not {MODEL_TYPE!r}")
    if raw.get("pos_embed", "perceptron") != "perceptron":
        raise ExportError(f"{ckpt}/config.json: only pos_embed 'perceptron' is supported")
    if int(raw.get("in_channels", 1)) != 1 or int(raw.get("spatial_dims", 3)) != 3:
        raise ExportError(f"{ckpt}/config.json: only 1-channel 3D images are supported")
    return ClipConfig(raw)


def _shape(state: dict[str, torch.Tensor], key: str, where: Path) -> tuple[int, ...]:
    if key not in state:
        raise ExportError(f"{where}: weight {key} missing (not an M3D-CLIP checkpoint?)")
    return tuple(state[key].shape)


def infer_bert_config(state: dict[str, torch.Tensor], where: Path):
    """A ``BertConfig`` from the ``language_encoder.*`` tensor shapes (layers, widths, vocab, positions)."""
    from transformers import BertConfig

    vocab, hidden = _shape(state, f"{TEXT}embeddings.word_embeddings.weight", where)
    positions = _shape(state, f"{TEXT}embeddings.position_embeddings.weight", where)[0]
    types = _shape(state, f"{TEXT}embeddings.token_type_embeddings.weight", where)[0]
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ExportError(f"{where}: BERT layers {layers[:5]}... are not numbered 0..N-1")
    inter = _shape(state, f"{TEXT}encoder.layer.0.intermediate.dense.weight", where)[0]
    if hidden % HEAD_DIM:
        raise ExportError(f"{where}: BERT width {hidden} is not a multiple of the {HEAD_DIM}-wide heads")
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // HEAD_DIM,
        intermediate_size=inter,
        max_position_embeddings=positions,
        type_vocab_size=types,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return cfg


class M3DClip(nn.Module):
    """M3D-CLIP with the released parameter names; ``encode_*`` return normalised token-0 embeddings."""

    def __init__(self, cfg: ClipConfig, bert_cfg, pooler: bool = True) -> None:
        from transformers import BertModel

        super().__init__()
        v = cfg.vit
        self.vision_encoder = ViT3D(cfg.image_size, cfg.patch_size, classification=True, **v)
        self.language_encoder = BertModel(bert_cfg, add_pooling_layer=pooler)
        self.mm_vision_proj = nn.Linear(v["hidden"], v["hidden"])
        self.mm_language_proj = nn.Linear(bert_cfg.hidden_size, v["hidden"])
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mm_vision_proj(self.vision_encoder(image)[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.language_encoder(
            input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        )
        return F.normalize(self.mm_language_proj(out.last_hidden_state[:, 0]), dim=-1)


def load_clip(ckpt: Path | str, allow_pickle: bool = False) -> tuple[M3DClip, ClipConfig]:
    """The torch model of a checkpoint folder, every released weight checked by name."""
    ckpt = Path(ckpt)
    cfg = read_clip_config(ckpt)
    state = {k: v for k, v in load_state_dict(ckpt, allow_pickle).items() if k not in _IGNORED}
    bert_cfg = infer_bert_config(state, ckpt)
    proj = _shape(state, "mm_language_proj.weight", ckpt)
    if proj[0] != cfg.vit["hidden"]:
        raise ExportError(
            f"{ckpt}: mm_language_proj maps to {proj[0]}, but the vision width (hidden_size) is {cfg.vit['hidden']}"
        )
    with torch.device("meta"):
        model = M3DClip(cfg, bert_cfg, pooler=f"{TEXT}pooler.dense.weight" in state)
    check_keys(model.state_dict().keys(), state.keys(), ckpt)
    model.load_state_dict(state, strict=True, assign=True)
    # computed buffers (position ids, token types) are not in the checkpoint: rebuild them off meta
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            n = buf.shape[-1]
            fresh = torch.arange(n).expand(buf.shape) if "position" in attr else torch.zeros(buf.shape)
            owner.register_buffer(attr, fresh.to(buf.dtype).contiguous(), persistent=False)
    return model.eval(), cfg


def clip_dims(model: M3DClip, cfg: ClipConfig) -> ClipDims:
    bert = model.language_encoder.config
    return ClipDims(
        family=MODEL_TYPE,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision_hidden=cfg.vit["hidden"],
        vision_layers=cfg.vit["layers"],
        text_hidden=bert.hidden_size,
        text_layers=bert.num_hidden_layers,
        vocab_size=bert.vocab_size,
        max_position_embeddings=bert.max_position_embeddings,
        max_text_len=min(cfg.max_text_len, bert.max_position_embeddings),
        embed_dim=cfg.vit["hidden"],
    )


class ImageEncoderGraph(nn.Module):
    def __init__(self, model: M3DClip) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image)


class TextEncoderGraph(nn.Module):
    def __init__(self, model: M3DClip) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


GRAPH_MODULES = {"image_encoder": ImageEncoderGraph, "text_encoder": TextEncoderGraph}


def example_inputs(name: str, dims: ClipDims, batch: int = 2, seq: int = 7, seed: int = 0) -> tuple:
    """Inputs for tracing and checks: random volumes, or random ids with right padding in row 0."""
    g = torch.Generator().manual_seed(seed)
    if name == "image_encoder":
        return (torch.rand(batch, 1, *dims.image_size, generator=g),)
    ids = torch.randint(5, dims.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2 + 1 :] = 0  # a padded row, so the mask path is traced and checked
    ids[0, seq // 2 + 1 :] = 0
    return ids, mask


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def check_graph(bundle: Path, name: str, module: nn.Module, dims: ClipDims) -> tuple[float, float]:
    """(min row cosine, max |diff|) of ORT against torch on inputs of shapes other than the traced ones."""
    import onnxruntime as ort

    spec = retrieval_graph_specs(dims)[name]
    args = example_inputs(name, dims, batch=3, seq=11, seed=1)
    session = ort.InferenceSession(str(bundle / spec.file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = module(*args).numpy()
    got = session.run(None, {n: a.numpy() for n, a in zip(spec.input_names(), args, strict=True)})[0]
    return float(row_cosines(got, ref).min()), float(np.abs(got - ref).max())


# -- tokenizer ---------------------------------------------------------------------------------------
def write_wordpiece_tokenizer(ckpt: Path, out: Path) -> str:
    """``tokenizer.json`` from the checkpoint's ``vocab.txt`` (or its own ``tokenizer.json``); returns sha256.

    Built with ``tokenizers``' BERT WordPiece pipeline (BERT normaliser with lowercasing per
    ``tokenizer_config.json``, ``[CLS] ... [SEP]`` post-processor). Truncation and padding are left to
    the runtime, which reads the length from the manifest.
    """
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    tok_cfg_path = ckpt / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    vocab, fast = ckpt / "vocab.txt", ckpt / "tokenizer.json"
    if vocab.is_file():
        tok = BertWordPieceTokenizer(
            str(vocab),
            lowercase=bool(tok_cfg.get("do_lower_case", True)),
            strip_accents=tok_cfg.get("strip_accents"),
            clean_text=True,
            handle_chinese_chars=bool(tok_cfg.get("tokenize_chinese_chars", True)),
        )
        tokenizer = tok._tokenizer
    elif fast.is_file():
        tokenizer = Tokenizer.from_file(str(fast))
    else:
        raise ExportError(f"{ckpt}: no vocab.txt or tokenizer.json (the BERT tokenizer files)")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    for special in ("[CLS]", "[SEP]", "[PAD]"):
        if tokenizer.token_to_id(special) is None:
            raise ExportError(f"{ckpt}: the BERT vocabulary has no {special} token")
    with atomic_path(out) as tmp:
        tokenizer.save(str(tmp))
    return sha256_file(out)


# -- export -------------------------------------------------------------------------------------------
def _export_towers(w: BundleWriter, model: M3DClip, dims: ClipDims, validate: bool) -> dict[str, float]:
    """Trace both towers; with ``validate`` each must reach :data:`MIN_COSINE`. Returns the cosines."""
    cosines: dict[str, float] = {}
    for name, spec in retrieval_graph_specs(dims).items():
        t0 = w.begin(name)
        module = GRAPH_MODULES[name](model).eval()
        export_graph(module, spec, example_inputs(name, dims), w.out / spec.file)
        diff = None
        if validate:
            cos, diff = check_graph(w.out, name, module, dims)
            cosines[name] = cos
            if not cos >= MIN_COSINE:
                raise ExportError(
                    f"{w.out / spec.file}: ONNX embeddings differ from torch (cosine {cos:.7f} < {MIN_COSINE})"
                )
        w.record(name, spec, graph_files(w.out, spec), t0, diff)
    return cosines


def _clip_token_ids(ckpt: Path, tokenizer_json: Path, dims: ClipDims) -> dict[str, int]:
    """The BERT special ids (cls, sep, pad, unk), the vocabulary checked against the text encoder's."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    token_ids = {t.strip("[]").lower(): tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]")}
    if tok.get_vocab_size() > dims.vocab_size:
        raise ExportError(
            f"{ckpt}: the tokenizer has {tok.get_vocab_size()} tokens, the text encoder only {dims.vocab_size}"
        )
    return token_ids


def export_clip_bundle(
    ckpt: Path | str,
    out: Path | str,
    *,
    allow_pickle: bool = False,
    validate: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportReport:
    """Export an M3D-CLIP checkpoint to a retrieval bundle; the manifest is written last, after the checks.

    Each tower must match torch with a row cosine of at least :data:`MIN_COSINE` (with ``validate``).
    """
    ckpt, out = Path(ckpt), Path(out)
    start = time.perf_counter()
    refuse_existing(out, overwrite)
    model, cfg = load_clip(ckpt, allow_pickle)
    dims = clip_dims(model, cfg)
    w = BundleWriter(out, progress)
    cosines = _export_towers(w, model, dims, validate)
    tok_sha = write_wordpiece_tokenizer(ckpt, out / TOKENIZER)
    manifest = Manifest(
        bundle_id=bundle_id("clip", w.graph_hashes()),
        producer=f"m3d-edge {__version__}",
        dims=dims,
        token_ids=_clip_token_ids(ckpt, out / TOKENIZER, dims),
        prompt={"max_length": dims.max_text_len, "padding": "right"},
        preprocessing=preprocessing(dims.image_size),
        generation={},
        graphs=w.graphs,
        embed={},
        tokenizer={"file": TOKENIZER, "sha256": tok_sha},
        source={
            "checkpoint": ckpt.name,
            "model_type": MODEL_TYPE,
            "config_sha256": sha256_file(ckpt / "config.json"),
            "logit_scale": float(model.logit_scale.detach()),
            "export_cosine": cosines,
        },
        kind="retrieval",
    )
    return w.finish(manifest, start)


__all__ = [
    "MIN_COSINE",
    "MODEL_TYPE",
    "ClipConfig",
    "M3DClip",
    "export_clip_bundle",
    "infer_bert_config",
    "is_clip_checkpoint",
    "load_clip",
]
