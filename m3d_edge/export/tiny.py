"""Writes random-weight checkpoints in the exact layout of the released M3D-LaMed folders.

The demo, the tests and the benchmarks use them: ``config.json`` with the released fields, sharded
safetensors with ``model.safetensors.index.json``, a SentencePiece tokenizer with the M3D added tokens at
the released ids and ``generation_config.json``. Presets (docs/architecture.md §8): ``tiny`` (seconds on a laptop),
``bench`` (real ViT-B encoders, a 1024x8 Phi-3-shaped decoder), ``wide`` (Phi-3-mini width, 2 layers) and
``full`` (the released sizes: 16 GB Phi-3-4B, 28 GB Llama-2-7B, streamed to disk shard by shard).
The released configs carry no ViT sizes; ours add ``vit_*`` fields only when they differ from ViT-B.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from m3d_edge.export.checkpoint import INDEX, read_config
from m3d_edge.export.reference import build_model
from m3d_edge.fileio import atomic_write_text

PHI3_BASE: dict[str, Any] = {
    "architectures": ["LamedPhi3ForCausalLM"],
    "model_type": "lamed_phi3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "vocab_size": 32015,
    "seg_token_id": 32014,
}
LLAMA_BASE: dict[str, Any] = {
    "architectures": ["LamedLlamaForCausalLM"],
    "model_type": "lamed_llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 4096,
    "mlp_bias": False,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "vocab_size": 32004,
    "seg_token_id": 32003,
}
LAMED_FIELDS: dict[str, Any] = {
    "image_channel": 1,
    "image_size": [32, 256, 256],
    "patch_size": [4, 16, 16],
    "vision_tower": "vit3d",
    "vision_select_layer": -1,
    "vision_select_feature": "patch",
    "mm_projector_type": "spp",
    "proj_layer_type": "mlp",
    "proj_layer_num": 2,
    "proj_pooling_type": "spatial",
    "proj_pooling_size": 2,
    "segmentation_module": "segvol",
    "num_new_tokens": 4,
}
GENERATION = {
    "phi3": {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000},
    "llama": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "decoder": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "vit": {"vit_hidden_size": 64, "vit_mlp_dim": 128, "vit_num_layers": 2, "vit_num_heads": 4},
        # at hidden 64, std 0.2 collapses greedy output to one repeated token; 1.0 keeps it varied
        "decoder_std": 1.0,
    },
    "bench": {
        "decoder": {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "vocab_size": 32064,
        },
        "vit": {},
        "decoder_std": 0.2,
    },
    "wide": {
        "decoder": {
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 2,
            "num_attention_heads": 32,
            "vocab_size": 32064,
        },
        "vit": {},
        "decoder_std": 0.2,
    },
    # the released sizes (docs/architecture.md §1), written shard by shard (:mod:`m3d_edge.export.full_checkpoint`)
    "full": {
        "decoder": {
            "phi3": {
                "hidden_size": 3072,
                "intermediate_size": 8192,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
            },
            "llama": {
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
            },
        },
        "vit": {},
        "decoder_std": 0.02,
        "streamed": True,
    },
}


def tiny_config(family: str, preset: str = "tiny") -> dict[str, Any]:
    """``config.json`` content for a family ("phi3" | "llama") and a preset."""
    if family not in GENERATION:
        raise ValueError(f"unknown family {family!r} (phi3 or llama)")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(PRESETS)})")
    p = PRESETS[preset]
    cfg = dict(PHI3_BASE if family == "phi3" else LLAMA_BASE)
    cfg.update(LAMED_FIELDS)
    decoder = p["decoder"].get(family, p["decoder"])  # "full" has per-family sizes
    cfg.update(decoder)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    cfg.update(p["vit"])
    cfg["mm_hidden_size"] = cfg.get("vit_hidden_size", 768)
    return cfg


@torch.no_grad()
def _randomize(model: torch.nn.Module, decoder_std: float, gen: torch.Generator) -> None:
    """Deterministic, non-degenerate weights: norms and biases perturbed, decoder matrices at ``decoder_std``."""
    for name, p in model.named_parameters():
        if name.startswith("model.layers.") or name.startswith(("model.embed_tokens", "lm_head")):
            if p.ndim == 2:
                p.normal_(0.0, decoder_std, generator=gen)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1 and ("norm" in name or name.endswith(".weight")):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias") or "position_embeddings" in name or "cls_token" in name or p.ndim == 1:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        if name == "model.norm.weight":
            p.fill_(1.0)


def write_tiny_checkpoint(
    out: Path | str,
    family: str = "phi3",
    preset: str = "tiny",
    seed: int = 0,
    decoder_std: float | None = None,
    shards: int = 2,
    trained: bool = False,
    teach_steps: int = 150,
    progress: Callable[[int, float], None] | None = None,
    layer_progress: Callable[[int, int], None] | None = None,
    seg_band: bool = False,
) -> Path:
    """Write a random-weight M3D-LaMed checkpoint folder; the same seed gives the same files.

    ``trained``: start the decoder from a small initialisation (std 0.02) and teach it fixed answers to the
    task prompts (:mod:`m3d_edge.export.teach`), so its greedy output is confident like a real model's;
    about a minute for the tiny preset. ``progress(step, loss)`` reports that training.
    The ``full`` preset streams its weights shard by shard; ``layer_progress(done, total)`` counts layers. ``seg_band``: a
    SegVol head whose mask follows the demo phantom's liver (:mod:`m3d_edge.export.demo_seg`).
    """
    from m3d_edge.export.tiny_tokenizer import write_tokenizer_files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, preset)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    gen_cfg = dict(GENERATION[family], transformers_version=config["transformers_version"])
    atomic_write_text(out / "generation_config.json", json.dumps(gen_cfg, indent=2) + "\n")
    write_tokenizer_files(out, family, seed=seed)

    if PRESETS[preset].get("streamed"):
        if trained:
            raise ValueError(f"preset {preset!r}: --trained is for the small presets (it trains in memory)")
        from m3d_edge.export.full_checkpoint import write_streamed_weights

        std = PRESETS[preset]["decoder_std"] if decoder_std is None else decoder_std
        gen = torch.Generator().manual_seed(seed)
        write_streamed_weights(out, lambda m: _randomize(m, std, gen), std, seed, progress=layer_progress)
        return out
    torch.manual_seed(seed)
    cfg = read_config(out)
    model = build_model(cfg)
    if decoder_std is None:
        decoder_std = 0.02 if trained else PRESETS[preset]["decoder_std"]
    _randomize(model, decoder_std, torch.Generator().manual_seed(seed))
    if trained:
        from transformers import PreTrainedTokenizerFast

        from m3d_edge.export.reference import ReferenceModel
        from m3d_edge.export.side_files import read_token_ids
        from m3d_edge.export.teach import teach_answers
        from m3d_edge.export.tokenizer import convert_tokenizer

        eos = read_token_ids(out)["eos"]
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=convert_tokenizer(out))  # the bundle's tokenizer
        teach_answers(ReferenceModel(model, cfg), tokenizer, eos, steps=teach_steps, progress=progress)
    if seg_band:
        from m3d_edge.export.demo_seg import phantom_liver_band, set_band_head
        from m3d_edge.runtime.imaging.phantom import phantom_hu

        set_band_head(model.get_submodule("model.seg_module"), *phantom_liver_band(phantom_hu()))
    _save_weights(model, out, shards)
    return out


def _save_weights(model: torch.nn.Module, out: Path, shards: int) -> None:
    """Sharded safetensors plus ``model.safetensors.index.json``, as the released checkpoints are laid out."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    per_shard, weight_map, shard, size, files = total / shards, {}, [], 0, []
    for i, name in enumerate(names):
        shard.append(name)
        size += state[name].numel() * state[name].element_size()
        if size >= per_shard * (len(files) + 1) or i == len(names) - 1:
            files.append(shard)
            shard = []
    for i, keys in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(out / INDEX, json.dumps(index, indent=2) + "\n")
