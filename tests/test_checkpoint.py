"""Checkpoint reading and the tiny checkpoint writer: released layout, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from m3d_edge.errors import ExportError
from m3d_edge.export.checkpoint import INDEX, load_state_dict, read_config, weight_files
from m3d_edge.export.reference import ReferenceModel
from m3d_edge.export.tiny import tiny_config, write_tiny_checkpoint

RELEASED_KEYS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.vision_tower.vision_tower.cls_token",
    "model.vision_tower.vision_tower.patch_embedding.position_embeddings",
    "model.vision_tower.vision_tower.patch_embedding.patch_embeddings.1.weight",
    "model.vision_tower.vision_tower.blocks.0.attn.qkv.weight",
    "model.vision_tower.vision_tower.blocks.0.mlp.linear1.weight",
    "model.mm_projector.projector.0.weight",
    "model.mm_projector.projector.2.weight",
    "model.seg_projector.0.weight",
    "model.seg_projector.2.weight",
    "model.seg_module.image_encoder.blocks.0.attn.out_proj.weight",
    "model.seg_module.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "model.seg_module.prompt_encoder.no_mask_embed.weight",
    "model.seg_module.mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
    "model.seg_module.mask_decoder.output_upscaling.1.weight",
    "model.seg_module.mask_decoder.txt_align_upscaled_embedding.weight",
    "model.seg_module.mask_decoder.iou_prediction_head.layers.2.weight",
]


def test_released_layout(tiny_checkpoints, family):
    ckpt = tiny_checkpoints[family]
    index = json.loads((ckpt / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 2
    state = load_state_dict(ckpt)
    for key in RELEASED_KEYS:
        assert key in state, key
    assert not any("qkv.bias" in k for k in state)  # MONAI ViT: qkv without bias
    if family == "phi3":
        assert (
            "model.layers.0.self_attn.qkv_proj.weight" in state
            and "model.layers.0.mlp.gate_up_proj.weight" in state
        )
        assert state["model.embed_tokens.weight"].shape[0] == 32015
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in state
        assert state["model.embed_tokens.weight"].shape[0] == 32004
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == f"lamed_{family}" and config["rope_theta"] == 10000.0
    assert config["image_size"] == [32, 256, 256] and config["patch_size"] == [4, 16, 16]


def test_writer_is_deterministic(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", "llama", seed=3)
    b = write_tiny_checkpoint(tmp_path / "b", "llama", seed=3)
    c = write_tiny_checkpoint(tmp_path / "c", "llama", seed=4)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    wa, wc = load_state_dict(a), load_state_dict(c)
    assert not torch.equal(wa["lm_head.weight"], wc["lm_head.weight"])


def test_vit_defaults_to_vit_b_when_config_is_silent():
    cfg = tiny_config("phi3", "bench")
    assert "vit_hidden_size" not in cfg  # the released configs carry no ViT sizes
    from m3d_edge.export.checkpoint import LamedConfig

    assert LamedConfig("phi3", cfg).vit == {"hidden": 768, "mlp_dim": 3072, "layers": 12, "heads": 12}


def test_unsupported_model_type(tmp_path, tiny_checkpoints):
    ckpt = tmp_path / "c"
    shutil.copytree(tiny_checkpoints["phi3"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llava"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="unsupported model_type 'llava'"):
        read_config(ckpt)


def test_missing_shard(tmp_path, tiny_checkpoints):
    ckpt = tmp_path / "c"
    shutil.copytree(tiny_checkpoints["phi3"], ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ExportError, match=r"missing shards model-00002-of-00002.safetensors"):
        weight_files(ckpt)


def test_missing_and_unexpected_keys_in_one_message(tmp_path, tiny_checkpoints):
    ckpt = tmp_path / "c"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    shard = ckpt / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    victim = sorted(state)[0]
    state["model.surprise.weight"] = state.pop(victim)
    save_file(state, str(shard))
    with pytest.raises(ExportError) as e:
        ReferenceModel.from_checkpoint(ckpt)
    msg = str(e.value)
    assert "1 missing keys: " + victim in msg and "1 unexpected keys: model.surprise.weight" in msg
    assert "\n" not in msg


def test_pickle_weights_need_explicit_permission(tmp_path, tiny_checkpoints):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    shutil.copy(tiny_checkpoints["phi3"] / "config.json", ckpt)
    torch.save({"x": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    with pytest.raises(ExportError, match="--allow-pickle"):
        weight_files(ckpt)
    assert weight_files(ckpt, allow_pickle=True) == [ckpt / "pytorch_model.bin"]


class _Marker:
    """Unpickling this writes a marker file: the code an attacker's shard would run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_checkpoint(tmp_path, tiny_checkpoints, shard_name: str = "evil.bin"):
    import pickle

    ckpt = tmp_path / "c"
    shutil.copytree(tiny_checkpoints["phi3"], ckpt)
    marker = tmp_path / "marker-ran"
    with open(ckpt / shard_name, "wb") as f:
        pickle.dump({"model.norm.weight": _Marker(str(marker))}, f)
    index = json.loads((ckpt / INDEX).read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = shard_name
    (ckpt / INDEX).write_text(json.dumps(index))
    return ckpt, marker


def test_index_bin_shard_refused_without_allow_pickle(tmp_path, tiny_checkpoints):
    ckpt, marker = _crafted_checkpoint(tmp_path, tiny_checkpoints)
    with pytest.raises(ExportError, match=r"evil\.bin is pickled weights.*--allow-pickle"):
        load_state_dict(ckpt)
    assert not marker.exists()


def test_index_bin_shard_with_allow_pickle_is_weights_only(tmp_path, tiny_checkpoints):
    ckpt, marker = _crafted_checkpoint(tmp_path, tiny_checkpoints)
    with pytest.raises(ExportError, match=r"evil\.bin: not a plain tensor pickle, refused"):
        load_state_dict(ckpt, allow_pickle=True)
    assert not marker.exists()


def test_export_cli_refuses_crafted_index(tmp_path, tiny_checkpoints):
    from typer.testing import CliRunner

    from m3d_edge.cli.app import app

    ckpt, marker = _crafted_checkpoint(tmp_path, tiny_checkpoints)
    r = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--no-validate"])
    assert r.exit_code == 6 and "evil.bin" in r.stderr and not marker.exists(), r.output
    r = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--allow-pickle"])
    assert r.exit_code == 6 and "evil.bin" in r.stderr and not marker.exists(), r.output


def test_plain_tensor_pickle_loads_with_allow_pickle(tmp_path, tiny_checkpoints):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    shutil.copy(tiny_checkpoints["phi3"] / "config.json", ckpt)
    torch.save({"x": torch.ones(2)}, ckpt / "pytorch_model.bin")
    assert torch.equal(load_state_dict(ckpt, allow_pickle=True)["x"], torch.ones(2))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_index_shards_confined_to_checkpoint(tmp_path, tiny_checkpoints, kind):
    ckpt = tmp_path / "c"
    shutil.copytree(tiny_checkpoints["phi3"], ckpt)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(ckpt / "model-00001-of-00002.safetensors", outside)
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}[kind]
    if kind == "symlink":
        (ckpt / name).symlink_to(outside)
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], name)
    (ckpt / INDEX).write_text(json.dumps(index))
    with pytest.raises(ExportError, match="points outside the checkpoint folder") as e:
        weight_files(ckpt)
    assert name in str(e.value)
