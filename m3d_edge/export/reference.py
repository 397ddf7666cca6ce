"""The PyTorch reference of M3D-LaMed: the released state-dict layout and M3D's generate semantics.

The decoder is transformers' own ``Phi3ForCausalLM`` / ``LlamaForCausalLM``; the vision tower, projector,
seg projector and SegVol are attached under ``model.`` exactly where the released checkpoints keep them, so
``load_state_dict(strict=True)`` proves the layout. :class:`ReferenceModel` is the oracle the exported
graphs and the runtime are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from m3d_edge.errors import ExportError
from m3d_edge.export.checkpoint import LamedConfig, check_keys, load_state_dict, read_config
from m3d_edge.export.segvol import SegVol
from m3d_edge.export.vit import ViT3D


class VisionTower(nn.Module):
    """``model.vision_tower``: the ViT with cls; features of the last layer without the cls token."""

    def __init__(self, cfg: LamedConfig) -> None:
        super().__init__()
        self.vision_tower = ViT3D(cfg.image_size, cfg.patch_size, classification=True, **cfg.vit)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(images)[:, 1:]


class SpatialPoolingProjector(nn.Module):
    """``model.mm_projector`` ("spp"): 3D average pooling of the patch grid, then the MLP."""

    def __init__(self, cfg: LamedConfig) -> None:
        super().__init__()
        raw = cfg.raw
        if raw.get("mm_projector_type", "spp") != "spp" or raw.get("proj_layer_type", "mlp") != "mlp":
            raise ExportError("config.json: only the 'spp' projector with 'mlp' layers is supported")
        if raw.get("proj_pooling_type", "spatial") != "spatial":
            raise ExportError("config.json: only proj_pooling_type 'spatial' is supported")
        self.grid = tuple(i // p for i, p in zip(cfg.image_size, cfg.patch_size, strict=True))
        self.pool = cfg.pooling_size
        layers: list[nn.Module] = [nn.Linear(cfg.mm_hidden_size, cfg.hidden_size)]
        for _ in range(1, int(raw.get("proj_layer_num", 2))):
            layers += [nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)]
        self.projector = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, *self.grid)
        # CPU torch has no bfloat16 avg_pool3d: pool in float32, keep the caller's dtype
        x = F.avg_pool3d(x.float(), kernel_size=self.pool, stride=self.pool).to(x.dtype)
        return self.projector(x.flatten(2).transpose(1, 2))


def build_model(cfg: LamedConfig) -> nn.Module:
    """The full M3D-LaMed module tree (random weights) in the released layout."""
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    cls = Phi3ForCausalLM if cfg.family == "phi3" else LlamaForCausalLM
    model = cls(cfg.decoder_config())
    inner = model.model
    inner.vision_tower = VisionTower(cfg)
    inner.mm_projector = SpatialPoolingProjector(cfg)
    if cfg.has_seg:
        inner.seg_projector = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.hidden_size),
            nn.ReLU(),
            nn.Linear(cfg.hidden_size, cfg.mm_hidden_size),
            nn.Dropout(0.1),
        )
        v = cfg.vit
        inner.seg_module = SegVol(
            cfg.image_size, cfg.patch_size, v["hidden"], v["mlp_dim"], v["layers"], v["heads"]
        )
    return model.eval()


def _materialize_buffers(model: nn.Module) -> None:
    """Recreate computed (non-persistent) buffers left on the meta device, e.g. rotary frequencies."""
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "config"):
                raise ExportError(f"cannot materialize buffers of {name or 'model'}")
            fresh = type(module)(config=module.config)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], fresh)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"weights not loaded: {', '.join(left[:5])}")


class LogitBias:
    """A transformers logits processor adding a fixed bias to chosen token ids (forces [SEG] in tests)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.bias = bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for token, value in self.bias.items():
            scores[:, token] += value
        return scores


@dataclass
class ReferenceOutput:
    tokens: list[int]  # new tokens only, as M3D's generate returns them
    seg_logits: torch.Tensor | None  # [1, 1, D, H, W]; None when seg was not requested
    seg_hidden: torch.Tensor | None  # the (averaged) hidden state fed to seg_projector; None without [SEG]


class ReferenceModel:
    """M3D-LaMed in PyTorch, with M3D's own generate semantics; the oracle of every parity test."""

    def __init__(self, model: nn.Module, cfg: LamedConfig, seg_token_id: int | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.seg_token_id = seg_token_id if seg_token_id is not None else cfg.raw.get("seg_token_id")

    @classmethod
    def from_checkpoint(cls, ckpt: Path | str, allow_pickle: bool = False) -> ReferenceModel:
        ckpt = Path(ckpt)
        cfg = read_config(ckpt)
        state = load_state_dict(ckpt, allow_pickle)
        with torch.device("meta"):  # no random init, no second copy: the loaded tensors become the weights
            model = build_model(cfg)
        expected = model.state_dict().keys()
        tied = cfg.raw.get("tie_word_embeddings") and "lm_head.weight" not in state
        if tied:
            expected = [k for k in expected if k != "lm_head.weight"]
        check_keys(expected, state.keys(), ckpt)
        model.load_state_dict(state, strict=False, assign=True)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        _materialize_buffers(model)
        return cls(model, cfg)

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    @torch.no_grad()
    def encode_images(self, image: torch.Tensor) -> torch.Tensor:
        return self.inner.mm_projector(self.inner.vision_tower(image))

    def splice(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with positions 1..N overwritten by the N image features (M3D's splice).

        Not wrapped in ``no_grad``: training (:mod:`m3d_edge.export.teach`) backpropagates through it.
        """
        emb = self.inner.embed_tokens(input_ids)
        n = image_features.shape[1]
        return torch.cat((emb[:, :1], image_features, emb[:, n + 1 :]), dim=1)

    @torch.no_grad()
    def seg_logits(self, image: torch.Tensor, seg_hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.seg_module(image, self.inner.seg_projector(seg_hidden))

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: list[int],
        seg: bool = False,
        logit_bias: dict[int, float] | None = None,
        **sampling,
    ) -> ReferenceOutput:
        """M3D's ``generate`` through transformers' ``generate`` on the spliced embeddings.

        With ``seg``: the post-norm last hidden state of every position whose next token is [SEG] (the
        state that predicted it; a [SEG] as the very first new token is not counted, as in M3D), averaged
        when there are several, goes through seg_projector and SegVol; no [SEG] -> logits of -inf.
        """
        from transformers import LogitsProcessorList

        embeds = self.splice(input_ids, self.encode_images(image))
        processors = LogitsProcessorList([LogitBias(logit_bias)] if logit_bias else [])
        out = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(input_ids.shape, dtype=torch.long),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id[0],
            logits_processor=processors,
            output_hidden_states=seg,
            return_dict_in_generate=True,
            do_sample=bool(sampling.pop("do_sample", False)),
            **sampling,
        )
        tokens = out.sequences[0].tolist()
        if not seg:
            return ReferenceOutput(tokens, None, None)
        seg_mask = out.sequences[0, 1:] == self.seg_token_id
        last = torch.cat([step[-1] for step in out.hidden_states[1:]], dim=1)[0]
        if int(seg_mask.sum()) == 0:
            logits = torch.full((1, 1, *self.cfg.image_size), -torch.inf)
            return ReferenceOutput(tokens, logits, None)
        hidden = last[seg_mask].mean(dim=0, keepdim=True)
        return ReferenceOutput(tokens, self.seg_logits(image, hidden), hidden)
