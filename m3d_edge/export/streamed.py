"""Reading a checkpoint in parts: the encoders without the decoder layers, or the first k decoder layers.

The full-size checkpoints do not fit twice in memory (16 GB Phi-3-4B, 28 GB Llama-2-7B in float32), so the
exporter never builds the whole model: the encoders' graphs are traced from a model without decoder
layers, the decoder is written layer by layer (:mod:`m3d_edge.export.decoder_onnx`) and validated against
a torch decoder holding its first ``k`` layers (:func:`truncated_decoder`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from m3d_edge.errors import ExportError
from m3d_edge.export.checkpoint import LamedConfig, check_keys, load_state_dict, read_config, weight_files
from m3d_edge.export.decoder_weights import ShardReader

LAYER_PREFIX = "model.layers."


def _is_layer(name: str) -> bool:
    return name.startswith(LAYER_PREFIX)


def _without_layers(cfg: LamedConfig, keep: int = 0) -> LamedConfig:
    return LamedConfig(family=cfg.family, raw={**cfg.raw, "num_hidden_layers": keep})


def _load(ckpt: Path, names: list[str], allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The named tensors only: lazily from safetensors, or (pickles) from a full load."""
    if all(f.suffix == ".safetensors" for f in weight_files(ckpt, allow_pickle)):
        src = ShardReader(ckpt)
        return {n: torch.from_numpy(src.get(n)) for n in names if n in src}
    state = load_state_dict(ckpt, allow_pickle)
    return {n: state[n] for n in names if n in state}


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], ckpt: Path) -> None:
    from m3d_edge.export.reference import _materialize_buffers

    expected = list(model.state_dict().keys())
    tied = "lm_head.weight" in expected and "lm_head.weight" not in state
    if tied:
        expected.remove("lm_head.weight")
    check_keys(expected, state.keys(), ckpt)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_buffers(model)


def checkpoint_names(ckpt: Path, allow_pickle: bool = False) -> list[str]:
    from m3d_edge.export.checkpoint import INDEX
    from m3d_edge.export.side_files import read_json

    index = Path(ckpt) / INDEX
    if index.is_file():
        return list(read_json(index).get("weight_map", {}))
    if (Path(ckpt) / "model.safetensors").is_file():
        return list(ShardReader(ckpt).where)
    return list(load_state_dict(ckpt, allow_pickle))


def encoders_model(ckpt: Path, allow_pickle: bool = False) -> tuple[torch.nn.Module, LamedConfig]:
    """The M3D-LaMed module tree without decoder layers (encoders, projectors, embedding, lm_head)."""
    from m3d_edge.export.reference import build_model

    ckpt = Path(ckpt)
    cfg = read_config(ckpt)
    names = [n for n in checkpoint_names(ckpt, allow_pickle) if not _is_layer(n)]
    with torch.device("meta"):
        model = build_model(_without_layers(cfg))
    _assign(model, _load(ckpt, names, allow_pickle), ckpt)
    return model.eval().requires_grad_(False), cfg


def truncated_decoder(ckpt: Path, cfg: LamedConfig, layers: int) -> torch.nn.Module:
    """transformers' decoder with the checkpoint's first ``layers`` layers, final norm and lm_head."""
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    small = _without_layers(cfg, layers)
    cls = Phi3ForCausalLM if cfg.family == "phi3" else LlamaForCausalLM
    with torch.device("meta"):
        model = cls(small.decoder_config())
    names = [n for n in model.state_dict() if not n.startswith(LAYER_PREFIX) or int(n.split(".")[2]) < layers]
    state = _load(Path(ckpt), names, allow_pickle=False)
    if not state:
        raise ExportError(f"{ckpt}: no decoder weights found")
    _assign(model, state, Path(ckpt))
    return model.eval().requires_grad_(False)
