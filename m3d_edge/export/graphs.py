"""The torch modules behind each exported graph, with the signatures of :func:`m3d_edge.bundle.graph_specs`."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from m3d_edge.bundle import ModelDims
from m3d_edge.export.checkpoint import LamedConfig


def model_dims(cfg: LamedConfig) -> ModelDims:
    raw = cfg.raw
    heads = int(raw["num_attention_heads"])
    sliding = raw.get("sliding_window") if cfg.family == "phi3" else None
    return ModelDims(
        family=cfg.family,
        hidden_size=cfg.hidden_size,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or cfg.hidden_size // heads),
        vocab_size=int(raw["vocab_size"]),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        sliding_window=int(sliding) if sliding else None,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision_hidden=cfg.vit["hidden"],
        seg_hidden=cfg.mm_hidden_size,
        num_image_tokens=cfg.num_image_tokens,
    )


class VisionGraph(nn.Module):
    """image -> image_embeds: vision tower (cls dropped) + spatial-pooling projector."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tower, self.projector = model.model.vision_tower, model.model.mm_projector

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(image))


class DecoderGraph(nn.Module):
    """One decoder step over the KV cache (layout note in :mod:`m3d_edge.bundle`).

    Returns the logits and post-norm hidden state of the last position and, per layer, the whole cache
    after the step (past followed by the new positions).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # transformers 5 renamed the cache argument; 4.x calls it past_key_values
        params = inspect.signature(model.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache([(past[i], past[i + 1]) for i in range(0, len(past), 2)])
        out = self.model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        hidden = out.last_hidden_state[:, -1]
        logits = self.model.lm_head(hidden)
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # updated in place
        return (logits, hidden, *present)


class SegEncoderGraph(nn.Module):
    """image -> SegVol image embedding ``[B, C, d, h, w]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.seg = model.model.seg_module

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.seg.encode(image)


class SegDecoderGraph(nn.Module):
    """(image embedding, [SEG] hidden state) -> full-resolution mask logits; seg_projector inside."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.seg, self.projector = model.model.seg_module, model.model.seg_projector

    def forward(self, image_embedding: torch.Tensor, seg_hidden: torch.Tensor) -> torch.Tensor:
        return self.seg.decode(image_embedding, self.projector(seg_hidden))


GRAPH_MODULES = {
    "vision": VisionGraph,
    "decoder": DecoderGraph,
    "seg_encoder": SegEncoderGraph,
    "seg_decoder": SegDecoderGraph,
}


def example_inputs(name: str, dims: ModelDims, batch: int = 2, past: int = 5, seq: int = 3) -> tuple:
    """Inputs for tracing; no dynamic axis is 1 so no size gets specialised to a constant."""
    g = torch.Generator().manual_seed(0)
    if name in ("vision", "seg_encoder"):
        return (torch.rand(batch, 1, *dims.image_size, generator=g),)
    if name == "seg_decoder":
        emb = torch.randn(batch, dims.seg_hidden, *dims.feature_grid, generator=g)
        return (emb, torch.randn(batch, dims.hidden_size, generator=g))
    kv = [
        torch.randn(batch, dims.num_kv_heads, past, dims.head_dim, generator=g)
        for _ in range(2 * dims.num_layers)
    ]
    return (
        torch.randn(batch, seq, dims.hidden_size, generator=g),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        *kv,
    )
