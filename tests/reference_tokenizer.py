"""The slow reference tokenizer of the tests: transformers 4.x ``LlamaTokenizer`` semantics over SentencePiece.

It reads a checkpoint's ``tokenizer.model`` and side files itself, so the bundle's converted
``tokenizer.json`` (:mod:`m3d_edge.export.tokenizer`) is checked against an independent implementation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3d_edge.errors import ExportError
from m3d_edge.export.side_files import read_json, token_name
from m3d_edge.export.tokenizer import SPIECE_UNDERLINE


def _model_pb2() -> Any:
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


@dataclass(frozen=True)
class AddedTokenSpec:
    """One added token as transformers 4.x stores it in ``added_tokens_decoder``."""

    id: int
    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything the slow and fast tokenizers need from a checkpoint folder."""

    model_path: Path
    added: tuple[AddedTokenSpec, ...]
    legacy: bool
    add_bos_token: bool
    add_eos_token: bool
    bos_token: str
    eos_token: str
    unk_token: str
    pad_token: str | None


def read_tokenizer_spec(ckpt_dir: Path) -> TokenizerSpec:
    """Read ``tokenizer.model``'s side files of a checkpoint folder into a :class:`TokenizerSpec`."""
    ckpt_dir = Path(ckpt_dir)
    model_path = ckpt_dir / "tokenizer.model"
    if not model_path.is_file():
        raise ExportError(f"{model_path}: file not found")
    cfg_path = ckpt_dir / "tokenizer_config.json"
    cfg = read_json(cfg_path)
    smap = read_json(ckpt_dir / "special_tokens_map.json")
    added_ids = read_json(ckpt_dir / "added_tokens.json")
    if not isinstance(cfg, dict) or not isinstance(smap, dict) or not isinstance(added_ids, dict):
        raise ExportError(f"{ckpt_dir}: tokenizer JSON files must hold objects")

    def special_name(key: str, required: bool = True) -> str | None:
        name = token_name(smap.get(key)) or token_name(cfg.get(key))
        if name is None and required:
            raise ExportError(f"{ckpt_dir / 'special_tokens_map.json'}: missing {key}")
        return name

    extra = {token_name(t) for t in smap.get("additional_special_tokens", []) or []}
    named = {special_name("bos_token"), special_name("eos_token"), special_name("unk_token")}
    named.add(special_name("pad_token", required=False))
    specs: dict[int, AddedTokenSpec] = {}
    for key, d in (cfg.get("added_tokens_decoder") or {}).items():
        specs[int(key)] = AddedTokenSpec(
            id=int(key),
            content=d["content"],
            special=bool(d.get("special", False)),
            lstrip=bool(d.get("lstrip", False)),
            rstrip=bool(d.get("rstrip", False)),
            single_word=bool(d.get("single_word", False)),
            normalized=bool(d.get("normalized", not d.get("special", False))),
        )
    by_content = {s.content: s for s in specs.values()}
    for content, idx in added_ids.items():
        s = by_content.get(content)
        if s is not None and s.id != int(idx):
            raise ExportError(f"{ckpt_dir / 'added_tokens.json'}: {content} has id {idx}, config says {s.id}")
        if s is None:  # older layout without added_tokens_decoder
            special = content in extra or content in named
            specs[int(idx)] = AddedTokenSpec(
                id=int(idx), content=content, special=special, normalized=not special
            )
    return TokenizerSpec(
        model_path=model_path,
        added=tuple(specs[i] for i in sorted(specs)),
        legacy=bool(cfg.get("legacy", True)),
        add_bos_token=bool(cfg.get("add_bos_token", True)),
        add_eos_token=bool(cfg.get("add_eos_token", False)),
        bos_token=special_name("bos_token") or "",
        eos_token=special_name("eos_token") or "",
        unk_token=special_name("unk_token") or "",
        pad_token=special_name("pad_token", required=False),
    )


def _load_sp(path: Path, add_dummy_prefix: bool | None = None) -> Any:
    import sentencepiece as spm

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ExportError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if add_dummy_prefix is not None:
        proto = _model_pb2().ModelProto.FromString(data)
        proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
        data = proto.SerializeToString()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as exc:  # sentencepiece raises plain RuntimeError/OSError
        raise ExportError(f"{path}: not a SentencePiece model ({exc})") from None
    return sp


class SlowTokenizer:
    """Reference semantics of transformers 4.x's sentencepiece ``LlamaTokenizer`` for a checkpoint folder.

    Text is split on every added token (literal match, leftmost-longest, lstrip/rstrip honoured), each
    remaining segment is encoded by SentencePiece. ``legacy: true`` encodes each segment with the dummy
    prefix; ``legacy: false`` prefixes only the start of the text (a lone ``▁`` before a leading special
    token is dropped) and encodes later segments without it. Decoding mirrors the bundle's fast decoder.
    """

    def __init__(self, ckpt_dir: Path) -> None:
        self.spec = read_tokenizer_spec(ckpt_dir)
        self.legacy = self.spec.legacy
        self.sp = _load_sp(self.spec.model_path, add_dummy_prefix=None if self.legacy else False)
        self.add_prefix_space = _add_dummy_prefix(self.spec.model_path)
        self.added: dict[str, AddedTokenSpec] = {a.content: a for a in self.spec.added}
        self.added_by_id: dict[int, AddedTokenSpec] = {a.id: a for a in self.spec.added}
        self.special_ids = {a.id for a in self.spec.added if a.special}
        self.special_contents = {a.content for a in self.spec.added if a.special}
        for name in (self.spec.bos_token, self.spec.eos_token, self.spec.unk_token, self.spec.pad_token):
            if name:
                self.special_contents.add(name)
                self.special_ids.add(self.token_to_id(name))
        alts = sorted(self.added, key=lambda s: (-len(s), s))
        self._split_re = re.compile("(" + "|".join(re.escape(a) for a in alts) + ")") if alts else None
        self._unk_len = len(self.sp.encode(self.spec.unk_token))

    def __len__(self) -> int:
        return max([self.sp.get_piece_size() - 1, *self.added_by_id]) + 1

    def token_to_id(self, token: str) -> int:
        """Return the id of an added token or SentencePiece piece."""
        if token in self.added:
            return self.added[token].id
        return int(self.sp.piece_to_id(token))

    def id_to_token(self, idx: int) -> str:
        """Return the added token or piece of ``idx``."""
        if idx in self.added_by_id:
            return self.added_by_id[idx].content
        return str(self.sp.id_to_piece(idx))

    def _split(self, text: str) -> list[str]:
        if self._split_re is None:
            return [text]
        # re.split alternates text / match; drop empty text parts like transformers' Trie.split.
        tokens = [p for i, p in enumerate(self._split_re.split(text)) if i % 2 == 1 or p]
        for i, tok in enumerate(tokens):
            spec = self.added.get(tok)
            if spec is None:
                continue
            left = tokens[i - 1] if i > 0 else None
            right = tokens[i + 1] if i < len(tokens) - 1 else None
            if spec.rstrip and right:
                tokens[i + 1] = right.lstrip()
            if spec.lstrip and left:
                tokens[i - 1] = left.rstrip()
            if spec.single_word:
                if left and left[-1] != " ":
                    tokens[i - 1] += tok
                    tokens[i] = ""
                elif right and right[0] != " ":
                    tokens[i + 1] = tok + tokens[i + 1]
                    tokens[i] = ""
        return tokens

    def _sp_segment(self, text: str) -> list[int]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return list(self.sp.encode(text))
        ids = list(self.sp.encode(self.spec.unk_token + text))
        return ids[self._unk_len :] if len(ids) >= self._unk_len else ids

    def tokenize_ids(self, text: str) -> list[int]:
        """Encode ``text`` without BOS/EOS."""
        if not text:
            return []
        if not self.legacy:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        out: list[int] = []
        for seg in self._split(text):
            if seg in self.added:
                out.append(self.added[seg].id)
            elif seg:
                out.extend(self._sp_segment(seg))
        if (
            not self.legacy
            and len(out) > 1
            and self.id_to_token(out[0]) == SPIECE_UNDERLINE
            and self.id_to_token(out[1]) in self.special_contents
        ):
            out = out[1:]
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Encode ``text`` to ids, with BOS (and EOS) per the checkpoint's config."""
        ids = self.tokenize_ids(text)
        if add_special_tokens:
            if self.spec.add_bos_token:
                ids = [self.token_to_id(self.spec.bos_token), *ids]
            if self.spec.add_eos_token:
                ids = [*ids, self.token_to_id(self.spec.eos_token)]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Decode ids: pieces joined, ``▁`` -> space, byte pieces fused, one leading space stripped."""
        pieces: list[str] = []
        for idx in ids:
            idx = int(idx)
            if skip_special_tokens and idx in self.special_ids:
                continue
            pieces.append(self.id_to_token(idx))
        text = _decode_pieces(pieces)
        if self.add_prefix_space and text.startswith(" "):
            text = text[1:]
        return text


_BYTE_RE = re.compile(r"^<0x([0-9A-F]{2})>$")


def _decode_pieces(pieces: list[str]) -> str:
    """Join pieces like ``Replace('▁',' ') + ByteFallback + Fuse`` of ``tokenizers`` do."""
    out: list[str] = []
    pending = bytearray()

    def flush() -> None:
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(pending))
            pending.clear()

    for piece in pieces:
        m = _BYTE_RE.match(piece)
        if m:
            pending.append(int(m.group(1), 16))
            continue
        flush()
        out.append(piece.replace(SPIECE_UNDERLINE, " "))
    flush()
    return "".join(out)


def _add_dummy_prefix(model_path: Path) -> bool:
    proto = _model_pb2().ModelProto.FromString(Path(model_path).read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)
