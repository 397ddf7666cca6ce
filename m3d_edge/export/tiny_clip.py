"""Random-weight M3D-CLIP checkpoints in the released folder layout (``tiny-checkpoint --family clip``).

Written like ``save_pretrained`` of the original ``M3DCLIP`` plus ``BertTokenizer.save_pretrained``:
``config.json`` (``model_type: m3d_clip``, the ViT sizes under the original field names, a hub path for
the BERT and no BERT sizes), ``model.safetensors`` with the ``vision_encoder.*``, ``language_encoder.*``,
``mm_*_proj`` and ``logit_scale`` tensors, and ``vocab.txt`` / ``tokenizer_config.json`` /
``special_tokens_map.json``. Presets: ``tiny`` (ViT and BERT 64 wide, 2 layers; seconds) and ``bench``
(ViT-B and bert-base sizes, random weights, a small vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from m3d_edge.export.clip import ClipConfig, M3DClip
from m3d_edge.fileio import atomic_write_text

CONFIG_BASE: dict[str, Any] = {
    "architectures": ["M3DCLIP"],
    "auto_map": {"AutoConfig": "CLIP.M3DCLIPConfig", "AutoModel": "CLIP.M3DCLIP"},
    "model_type": "m3d_clip",
    "language_model_name_or_path": "./LaMed/pretrained_model/bert_base_uncased/",
    "local_loss": False,
    "gather_loss": True,
    "in_channels": 1,
    "img_size": [32, 256, 256],
    "patch_size": [4, 16, 16],
    "pos_embed": "perceptron",
    "dropout_rate": 0.0,
    "spatial_dims": 3,
    "max_text_len": 128,
    "vocab_size": 30522,
    "torch_dtype": "float32",
    "transformers_version": "4.40.1",
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vit": {"hidden_size": 64, "mlp_dim": 128, "num_layers": 2, "num_heads": 4},
        "bert": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128},
    },
    "bench": {
        "vit": {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12},
        "bert": {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072},
    },
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocab() -> list[str]:
    """A small uncased WordPiece vocabulary: specials, characters, ``##`` pieces and report words."""
    from m3d_edge.export.tiny_tokenizer import _WORDS

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?-/%()[]'\"")
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    suffixes = ["##s", "##ed", "##ing", "##ly", "##al", "##ic", "##ous", "##ion", "##er", "##es"]
    words = sorted(set(_WORDS) - set(chars))
    return SPECIALS + chars + pieces + suffixes + words


def _tokenizer_files(out: Path) -> None:
    atomic_write_text(out / "vocab.txt", "\n".join(tiny_vocab()) + "\n")
    tok_cfg = {
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "model_max_length": 512,
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
        "tokenizer_class": "BertTokenizer",
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
    special = {k: tok_cfg[k] for k in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token")}
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


@torch.no_grad()
def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if name == "logit_scale":
            continue
        if p.ndim == 1 and ("norm" in name.lower() or name.endswith("LayerNorm.weight")):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1 or "position_embeddings" in name or "cls_token" in name:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        elif "embeddings" in name and p.ndim == 2:
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def write_tiny_clip_checkpoint(out: Path | str, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight M3D-CLIP folder; the same seed gives the same files."""
    from safetensors.torch import save_file
    from transformers import BertConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown M3D-CLIP preset {preset!r} ({', '.join(PRESETS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = PRESETS[preset]
    config = {**CONFIG_BASE, **p["vit"]}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    _tokenizer_files(out)
    b = p["bert"]
    bert_cfg = BertConfig(
        vocab_size=len(tiny_vocab()),
        num_attention_heads=b["hidden_size"] // 64,
        max_position_embeddings=512,
        **b,
    )
    torch.manual_seed(seed)
    model = M3DClip(ClipConfig(config), bert_cfg)
    _randomize(model, torch.Generator().manual_seed(seed))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
