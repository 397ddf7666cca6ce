"""Full-size random-weight checkpoints (``tiny-checkpoint --preset full``), written shard by shard.

The released M3D-LaMed folders hold 16 GB (Phi-3-4B) and 28 GB (Llama-2-7B) of float32 weights. This
writer never holds the model: the small part (embedding, lm_head, encoders, projectors; about 2 GB) is
built with the reference model minus its decoder layers, and each decoder layer's tensors are drawn from
their own seeded generator, a few layers per safetensors shard, then freed. Peak memory is one shard plus
the small part.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from m3d_edge.export.checkpoint import INDEX, read_config
from m3d_edge.fileio import atomic_path, atomic_write_text

SHARD_BYTES = 2 << 30  # about 2 GiB of tensors per shard, like the released folders


def layer_shapes(raw: dict[str, Any], family: str) -> dict[str, tuple[int, ...]]:
    """Name (after ``model.layers.N.``) -> shape of one decoder layer's tensors, in the released layout."""
    h, inter = int(raw["hidden_size"]), int(raw["intermediate_size"])
    heads = int(raw["num_attention_heads"])
    kv = int(raw.get("num_key_value_heads") or heads)
    hd = int(raw.get("head_dim") or h // heads)
    norms = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    if family == "phi3":
        return {
            "self_attn.qkv_proj.weight": ((heads + 2 * kv) * hd, h),
            "self_attn.o_proj.weight": (h, heads * hd),
            "mlp.gate_up_proj.weight": (2 * inter, h),
            "mlp.down_proj.weight": (h, inter),
            **norms,
        }
    return {
        "self_attn.q_proj.weight": (heads * hd, h),
        "self_attn.k_proj.weight": (kv * hd, h),
        "self_attn.v_proj.weight": (kv * hd, h),
        "self_attn.o_proj.weight": (h, heads * hd),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
        **norms,
    }


def _layer_tensors(
    shapes: dict[str, tuple[int, ...]], layer: int, std: float, seed: int
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 100_003 + layer + 1)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        else:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        out[f"model.layers.{layer}.{name}"] = t
    return out


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def write_streamed_weights(
    out: Path,
    randomize: Callable[[torch.nn.Module], None],
    decoder_std: float,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write every weight of the checkpoint in ``out`` (its config.json is already there) shard by shard.

    ``randomize`` initialises the small part the way the other presets do. ``progress(done, total)``
    counts decoder layers.
    """
    from m3d_edge.export.reference import build_model

    cfg = read_config(out)
    raw = dict(cfg.raw)
    layers = int(raw["num_hidden_layers"])
    small_cfg = type(cfg)(family=cfg.family, raw={**raw, "num_hidden_layers": 0})
    torch.manual_seed(seed)
    small = build_model(small_cfg)
    randomize(small)
    rest = {k: v.detach().contiguous() for k, v in small.state_dict().items()}
    del small
    shapes = layer_shapes(raw, cfg.family)
    layer_bytes = 4 * sum(int(torch.Size(s).numel()) for s in shapes.values())
    per_shard = max(1, SHARD_BYTES // layer_bytes)
    groups = [list(range(i, min(i + per_shard, layers))) for i in range(0, layers, per_shard)]
    n_files = len(groups) + 1
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{n_files:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for layer in group:
            tensors.update(_layer_tensors(shapes, layer, decoder_std, seed))
        _save_shard(tensors, out / fname)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
        gc.collect()
        if progress:
            progress(group[-1] + 1, layers)
    fname = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    _save_shard(rest, out / fname)
    total += sum(t.numel() * t.element_size() for t in rest.values())
    weight_map.update(dict.fromkeys(rest, fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(out / INDEX, json.dumps(index, indent=2) + "\n")
