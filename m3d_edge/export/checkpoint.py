"""Reading a released M3D-LaMed Hugging Face folder: config, sharded safetensors, generation config.

No remote code and no network: ``config.json`` is parsed into :class:`LamedConfig` by us, weights come
from safetensors (pickled ``.bin`` weights only with ``allow_pickle=True``, since unpickling runs code).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3d_edge.errors import ExportError
from m3d_edge.export.side_files import read_json

FAMILIES = {"lamed_phi3": "phi3", "lamed_llama": "llama"}
VIT_B = {"hidden": 768, "mlp_dim": 3072, "layers": 12, "heads": 12}
# config.json fields of ours (absent in the released checkpoints, which hard-code ViT-B)
VIT_FIELDS = {
    "hidden": "vit_hidden_size",
    "mlp_dim": "vit_mlp_dim",
    "layers": "vit_num_layers",
    "heads": "vit_num_heads",
}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class LamedConfig:
    """The parts of ``config.json`` that shape the model, plus the raw dict for the decoder config."""

    family: str
    raw: dict[str, Any]

    @property
    def image_size(self) -> tuple[int, int, int]:
        return tuple(self.raw.get("image_size", (32, 256, 256)))  # type: ignore[return-value]

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.raw.get("patch_size", (4, 16, 16)))  # type: ignore[return-value]

    @property
    def vit(self) -> dict[str, int]:
        """ViT sizes shared by the vision tower and the SegVol encoder (ViT-B unless the config says)."""
        return {k: int(self.raw.get(f, VIT_B[k])) for k, f in VIT_FIELDS.items()}

    @property
    def hidden_size(self) -> int:
        return int(self.raw["hidden_size"])

    @property
    def mm_hidden_size(self) -> int:
        return int(self.raw.get("mm_hidden_size", self.vit["hidden"]))

    @property
    def pooling_size(self) -> int:
        return int(self.raw.get("proj_pooling_size", 2))

    @property
    def num_image_tokens(self) -> int:
        n = 1
        for i, p in zip(self.image_size, self.patch_size, strict=True):
            n *= i // p // self.pooling_size
        return n

    @property
    def has_seg(self) -> bool:
        return bool(self.raw.get("segmentation_module"))

    def decoder_config(self):
        """The transformers config of the decoder (``Phi3Config`` or ``LlamaConfig``)."""
        from transformers import LlamaConfig, Phi3Config

        cls = Phi3Config if self.family == "phi3" else LlamaConfig
        skip = {"model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype"}
        kwargs = {k: v for k, v in self.raw.items() if k not in skip}
        cfg = cls(**kwargs)
        cfg._attn_implementation = "eager"
        return cfg


def read_config(ckpt: Path) -> LamedConfig:
    """Parse ``config.json``; refuse model types other than lamed_phi3 / lamed_llama."""
    raw = read_json(Path(ckpt) / "config.json")
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ExportError(
            f"{ckpt}/config.json: unsupported model_type {model_type!r} (expected one of {sorted(FAMILIES)})"
        )
    missing = [
        k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in raw
    ]
    if missing:
        raise ExportError(f"{ckpt}/config.json: missing fields {', '.join(missing)}")
    return LamedConfig(family=FAMILIES[model_type], raw=raw)


def read_generation_config(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def confined(root: Path, rel: object, what: str) -> Path:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root`` (symlinks resolved).

    Raises :class:`ExportError` naming ``what`` (the index file) and the entry otherwise.
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ExportError(f"{what}: shard entry {rel!r} is not a file name")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ExportError(f"{what}: shard {rel!r} points outside the checkpoint folder")
    base = Path(root).resolve()
    try:
        target = (base / rel).resolve()
        (base / rel).is_file()  # a name the file system refuses (too long, ...) fails here, not later
    except (OSError, RuntimeError, ValueError) as e:
        raise ExportError(
            f"{what}: shard {rel[:80]!r} is not a usable file name ({type(e).__name__})"
        ) from None
    if not target.is_relative_to(base):
        raise ExportError(f"{what}: shard {rel!r} points outside the checkpoint folder")
    return Path(root) / rel


def _refuse_pickle(files: list[Path], where: Path) -> None:
    names = ", ".join(f.name for f in files)
    raise ExportError(
        f"{where}: {names} is pickled weights; unpickling runs arbitrary code, so pass"
        " --allow-pickle if you trust this checkpoint (or convert it to safetensors)"
    )


def weight_files(ckpt: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint, checked against the shard index when there is one.

    Every shard the index names must stay inside ``ckpt``; anything but ``.safetensors`` needs
    ``allow_pickle`` (and is then read with ``torch.load(weights_only=True)``).
    """
    ckpt = Path(ckpt)
    index = ckpt / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise ExportError(f"{index}: weight_map is not an object")
        values = list(weight_map.values())
        bad = [v for v in values if not isinstance(v, str)]
        if bad:
            raise ExportError(f"{index}: shard entry {bad[0]!r} is not a file name")
        shards = [confined(ckpt, s, str(index)) for s in sorted(set(values))]
        if not shards:
            raise ExportError(f"{index}: empty weight_map")
        pickled = [p for p in shards if p.suffix != ".safetensors"]
        if pickled and not allow_pickle:
            _refuse_pickle(pickled, index)
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ExportError(f"{ckpt}: missing shards {', '.join(missing)} (listed in {INDEX})")
        return shards
    single = ckpt / "model.safetensors"
    if single.is_file():
        return [confined(ckpt, single.name, str(ckpt))]
    bins = sorted(ckpt.glob("pytorch_model*.bin"))
    if bins and not allow_pickle:
        _refuse_pickle(bins, ckpt)
    if bins:
        return [confined(ckpt, b.name, str(ckpt)) for b in bins]
    raise ExportError(f"{ckpt}: no weights (no {INDEX}, model.safetensors or pytorch_model*.bin)")


def load_state_dict(ckpt: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint; pickled shards only with ``allow_pickle`` and never beyond tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(ckpt, allow_pickle):
        if f.suffix == ".safetensors":
            try:
                state.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as e:
                raise ExportError(f"{f}: unreadable safetensors shard ({e})") from e
            continue
        try:  # weights_only: tensors and plain containers only, no code runs
            loaded = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, EOFError, RuntimeError ...: one message
            raise ExportError(f"{f}: not a plain tensor pickle, refused ({type(e).__name__})") from e
        if not isinstance(loaded, dict):
            raise ExportError(f"{f}: expected a state dict, found {type(loaded).__name__}")
        state.update(loaded)
    return state


def check_keys(expected: Iterable[str], found: Iterable[str], where: Path) -> None:
    """One message listing missing and unexpected weight names (at most 10 of each)."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if not (missing or unexpected):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
            parts.append(f"{len(keys)} {label} keys: {', '.join(keys[:10])}{more}")
    raise ExportError(f"{where}: weights do not match the M3D-LaMed layout; " + "; ".join(parts))
