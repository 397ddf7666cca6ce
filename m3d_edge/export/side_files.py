"""The side files of a checkpoint: one JSON reader, ``tokenizer.model``, and the ids of M3D's own tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from m3d_edge.errors import ExportError

M3D_SPECIAL_TOKENS = ["<im_patch>", "<bx_start>", "<bx_end>"]
SEG_TOKEN = "[SEG]"
_M3D_KEYS = (*zip(("im_patch", "bx_start", "bx_end"), M3D_SPECIAL_TOKENS, strict=True), ("seg", SEG_TOKEN))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; a missing, unreadable or non-object file is an :class:`ExportError`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ExportError(
            f"{path}: unreadable JSON ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        ) from e
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return data


def read_proto(model_path: Path) -> Any:
    """The checkpoint's ``tokenizer.model`` as a SentencePiece ``ModelProto``."""
    from sentencepiece import sentencepiece_model_pb2

    try:
        return sentencepiece_model_pb2.ModelProto.FromString(model_path.read_bytes())
    except OSError as exc:
        raise ExportError(f"{model_path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # protobuf raises DecodeError
        raise ExportError(f"{model_path}: not a SentencePiece model ({exc})") from None


def token_name(value: Any) -> str | None:
    """A token's text, written as a string or as ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_token_ids(ckpt_dir: Path) -> dict[str, int]:
    """Return the ids of ``im_patch, bx_start, bx_end, seg, bos, eos, pad, unk`` read from a checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    added_path, smap_path = ckpt_dir / "added_tokens.json", ckpt_dir / "special_tokens_map.json"
    added, smap = read_json(added_path), read_json(smap_path)
    cfg_path = ckpt_dir / "tokenizer_config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    vocab = {d.get("content"): int(k) for k, d in (cfg.get("added_tokens_decoder") or {}).items()}
    vocab.update({k: int(v) for k, v in added.items()})
    ids: dict[str, int] = {}
    for key, content in _M3D_KEYS:
        if content not in added:
            raise ExportError(f"{added_path}: missing token {content}")
        ids[key] = int(added[content])
    for key in ("bos", "eos", "pad", "unk"):
        name = token_name(smap.get(f"{key}_token")) or token_name(cfg.get(f"{key}_token"))
        if name is None:
            raise ExportError(f"{smap_path}: missing {key}_token")
        if name not in vocab:  # a piece of tokenizer.model, not an added token
            pieces = {p.piece: i for i, p in enumerate(read_proto(ckpt_dir / "tokenizer.model").pieces)}
            if name not in pieces:
                raise ExportError(f"{ckpt_dir / 'tokenizer.model'}: missing token {name} ({key}_token)")
            vocab[name] = pieces[name]
        ids[key] = vocab[name]
    return ids
