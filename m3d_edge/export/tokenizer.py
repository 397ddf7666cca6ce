"""Tokenizer files of M3D-LaMed checkpoints and their conversion to a ``tokenizers`` ``tokenizer.json``.

The released checkpoints ship only the slow SentencePiece tokenizer (``tokenizer.model`` plus the
transformers 4.x JSON side files). This module

* writes deterministic tiny stand-ins in exactly that layout for tests (:func:`write_tokenizer_files`),
* reads the M3D token ids from such a folder (:func:`read_token_ids`),
* re-implements the slow ``LlamaTokenizer`` semantics as the reference (:class:`SlowTokenizer`),
* converts the SentencePiece model to a fast BPE tokenizer for the bundle (:func:`convert_tokenizer`).

Known, documented divergences of the fast tokenizer from the slow reference (both also present in
transformers' own converter, and never produced by M3D prompts) only exist for ``legacy: false``:
a text that starts with whitespace, and a text that starts with a *non-special* added token such as
``[SEG]`` (the slow tokenizer then keeps a lone ``▁`` id in front of it).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from m3d_edge.errors import ExportError
from m3d_edge.fileio import atomic_write_bytes

SPIECE_UNDERLINE = "▁"
VOCAB_SIZE = 32000
_NUM_BYTES = 256
_TRAIN_VOCAB = 3000

# ---------------------------------------------------------------------------------------------------------
# Added tokens of the released checkpoints
# ---------------------------------------------------------------------------------------------------------

_PHI3_TOKENS: list[tuple[str, bool]] = [  # (content, rstrip) for ids 32000-32010, all special
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|placeholder1|>", True),
    ("<|placeholder2|>", True),
    ("<|placeholder3|>", True),
    ("<|placeholder4|>", True),
    ("<|system|>", True),
    ("<|end|>", True),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", True),
]
M3D_SPECIAL_TOKENS = ["<im_patch>", "<bx_start>", "<bx_end>"]
SEG_TOKEN = "[SEG]"
FAMILIES = ("phi3", "llama")

# ---------------------------------------------------------------------------------------------------------
# Synthetic training corpus (no external data)
# ---------------------------------------------------------------------------------------------------------

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "in",
    "on",
    "at",
    "to",
    "for",
    "with",
    "and",
    "or",
    "no",
    "not",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "this",
    "that",
    "these",
    "those",
    "there",
    "here",
    "what",
    "where",
    "which",
    "who",
    "how",
    "can",
    "you",
    "please",
    "provide",
    "output",
    "give",
    "describe",
    "identify",
    "find",
    "show",
    "image",
    "scan",
    "volume",
    "mask",
    "segmentation",
    "caption",
    "findings",
    "impression",
    "medical",
    "report",
    "patient",
    "study",
    "series",
    "slice",
    "axial",
    "coronal",
    "sagittal",
    "liver",
    "kidney",
    "spleen",
    "pancreas",
    "lung",
    "lungs",
    "heart",
    "aorta",
    "bladder",
    "stomach",
    "colon",
    "bowel",
    "gallbladder",
    "brain",
    "chest",
    "abdomen",
    "pelvis",
    "spine",
    "bone",
    "rib",
    "vertebra",
    "adrenal",
    "gland",
    "lymph",
    "node",
    "nodes",
    "nodule",
    "nodules",
    "mass",
    "lesion",
    "lesions",
    "tumor",
    "tumour",
    "cyst",
    "cysts",
    "effusion",
    "pleural",
    "pericardial",
    "ascites",
    "fluid",
    "fracture",
    "calcification",
    "hypodense",
    "hyperdense",
    "enhancing",
    "enhancement",
    "contrast",
    "arterial",
    "venous",
    "phase",
    "ct",
    "mri",
    "pet",
    "ultrasound",
    "left",
    "right",
    "upper",
    "lower",
    "middle",
    "lobe",
    "segment",
    "bilateral",
    "unilateral",
    "diffuse",
    "focal",
    "small",
    "large",
    "multiple",
    "single",
    "measuring",
    "size",
    "mm",
    "cm",
    "normal",
    "abnormal",
    "unremarkable",
    "suspicious",
    "consistent",
    "likely",
    "possible",
    "evidence",
    "of",
    "metastasis",
    "metastases",
    "cancer",
    "carcinoma",
    "pneumonia",
    "emphysema",
    "atelectasis",
    "consolidation",
    "opacity",
    "ground",
    "glass",
    "thickening",
    "wall",
    "dilated",
    "obstruction",
    "stone",
    "stones",
    "hernia",
    "free",
    "air",
    "edema",
    "infarct",
    "hemorrhage",
    "bleeding",
    "organ",
    "organs",
    "region",
    "consists",
    "located",
    "within",
    "adjacent",
    "along",
    "compared",
    "prior",
    "previous",
    "stable",
    "increased",
    "decreased",
    "new",
    "seen",
    "noted",
    "demonstrates",
    "shows",
    "reveals",
    "suggests",
    "represents",
    "measures",
    "approximately",
    "about",
    "box",
    "coordinates",
    "answer",
    "question",
    "yes",
    "it",
    "its",
    "his",
    "her",
    "they",
    "we",
    "our",
    "model",
    "based",
    "on",
    "following",
    "position",
    "from",
    "into",
    "over",
    "under",
    "between",
]

_NON_ASCII = [
    "Läsion",
    "Oberlappen",
    "Unterlappen",
    "Lunge",
    "Leber",
    "Niere",
    "größe",
    "Befund",
    "rechts",
    "links",
    "über",
    "Größe",
    "été",
    "résumé",
    "naïve",
]
_CJK = ["肺", "肝", "肾", "癌", "影", "像", "结", "节", "病", "灶"]
_PUNCT = [".", ",", "?", ":", ";", "!", "-", "/", "%", "(", ")", "[", "]"]


def _corpus(seed: int, n_sentences: int = 6000) -> list[str]:
    """Return seeded English/medical-report-like training sentences."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n_sentences):
        n = rng.randint(4, 22)
        toks: list[str] = []
        for _ in range(n):
            r = rng.random()
            if r < 0.80:
                w = rng.choice(_WORDS)
                if rng.random() < 0.12:
                    w = w.capitalize()
                toks.append(w)
            elif r < 0.87:
                toks.append(str(rng.randint(0, 999)) if rng.random() < 0.6 else f"{rng.random():.3f}")
            elif r < 0.94:
                toks.append(rng.choice(_PUNCT))
            elif r < 0.98:
                toks.append(rng.choice(_NON_ASCII))
            else:
                toks.append(rng.choice(_CJK))
        sent = ""
        for t in toks:
            sent += t if not sent else rng.choice([" "] * 12 + ["", "  ", "    "]) + t
        out.append(sent)
    return out


# ---------------------------------------------------------------------------------------------------------
# tokenizer.model
# ---------------------------------------------------------------------------------------------------------


def _model_pb2() -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError(f"sentencepiece with protobuf support is required: {exc}") from exc
    return sentencepiece_model_pb2


def build_sentencepiece_model(seed: int = 0) -> bytes:
    """Return a serialized Llama-2-layout SentencePiece BPE ``ModelProto`` with 32000 pieces."""
    import sentencepiece as spm

    pb2 = _model_pb2()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=_TRAIN_VOCAB,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    proto = pb2.ModelProto.FromString(buf.getvalue())
    sp_type = pb2.ModelProto.SentencePiece
    pieces = list(proto.pieces)
    special = [p for p in pieces if p.type in (sp_type.UNKNOWN, sp_type.CONTROL)]
    normal = [p for p in pieces if p.type == sp_type.NORMAL]
    if [p.piece for p in special] != ["<unk>", "<s>", "</s>"] or any("<" in p.piece for p in normal):
        raise ExportError("SentencePiece training produced an unexpected special-piece layout")
    del proto.pieces[:]
    for p in special:
        proto.pieces.add().CopyFrom(p)
    for b in range(_NUM_BYTES):  # Llama puts the byte pieces right after the control pieces
        proto.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=sp_type.BYTE)
    for p in normal:
        proto.pieces.add().CopyFrom(p)
    n_fill = VOCAB_SIZE - len(proto.pieces)
    if n_fill < 0:
        raise ExportError(f"SentencePiece training produced {len(proto.pieces)} > {VOCAB_SIZE} pieces")
    low = min((p.score for p in normal), default=0.0) - 1.0
    # '<' never occurs in the corpus, so a filler can neither be split into two pieces nor be produced.
    for i in range(n_fill):
        proto.pieces.add(piece=f"<unused{i}>", score=low, type=sp_type.UNUSED)
    proto.trainer_spec.vocab_size = VOCAB_SIZE
    ns = proto.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = (
        "identity",
        True,
        False,
        True,
    )
    return proto.SerializeToString(deterministic=True)


def write_sentencepiece_model(path: Path, seed: int = 0) -> None:
    """Write a deterministic Llama-2-layout SentencePiece BPE ``tokenizer.model`` (32000 pieces)."""
    atomic_write_bytes(Path(path), build_sentencepiece_model(seed))


# ---------------------------------------------------------------------------------------------------------
# Side files in the transformers 4.x layout of the released checkpoints
# ---------------------------------------------------------------------------------------------------------


def _added(content: str, special: bool, rstrip: bool = False, normalized: bool | None = None) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": (not special) if normalized is None else normalized,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def tokenizer_side_files(family: str) -> dict[str, dict]:
    """Return the JSON side files (name -> content) of a released M3D checkpoint of ``family``."""
    if family not in FAMILIES:
        raise ExportError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    decoder: dict[int, dict] = {
        0: _added("<unk>", True),
        1: _added("<s>", True),
        2: _added("</s>", True),
    }
    next_id = VOCAB_SIZE
    if family == "phi3":
        for content, rstrip in _PHI3_TOKENS:
            decoder[next_id] = _added(content, True, rstrip=rstrip)
            next_id += 1
    for content in M3D_SPECIAL_TOKENS:
        decoder[next_id] = _added(content, True)
        next_id += 1
    decoder[next_id] = _added(SEG_TOKEN, False)
    eos = "<|endoftext|>" if family == "phi3" else "</s>"
    pad = "<|endoftext|>" if family == "phi3" else "<unk>"
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): d for i, d in sorted(decoder.items())},
        "additional_special_tokens": list(M3D_SPECIAL_TOKENS),
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "legacy": family == "llama",
        "model_max_length": 4096 if family == "phi3" else 2048,
        "pad_token": pad,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    added_tokens = {d["content"]: i for i, d in sorted(decoder.items()) if i >= VOCAB_SIZE}
    special_map = {
        "additional_special_tokens": [
            {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
            for t in M3D_SPECIAL_TOKENS
        ],
        "bos_token": {
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "eos_token": {
            "content": eos,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": pad,
        "unk_token": {
            "content": "<unk>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
    }
    return {
        "tokenizer_config.json": config,
        "added_tokens.json": added_tokens,
        "special_tokens_map.json": special_map,
    }


def write_tokenizer_files(ckpt_dir: Path, family: str, seed: int = 0) -> None:
    """Write ``tokenizer.model`` and the JSON side files of a released M3D checkpoint into ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    files = tokenizer_side_files(family)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_sentencepiece_model(ckpt_dir / "tokenizer.model", seed=seed)
    for name, content in files.items():
        atomic_write_bytes(
            ckpt_dir / name, (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode()
        )


# ---------------------------------------------------------------------------------------------------------
# Reading a checkpoint's tokenizer description
# ---------------------------------------------------------------------------------------------------------


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read JSON ({exc})") from None


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_spec(ckpt_dir: Path) -> TokenizerSpec:
    """Read ``tokenizer.model``'s side files of a checkpoint folder into a :class:`TokenizerSpec`."""
    ckpt_dir = Path(ckpt_dir)
    model_path = ckpt_dir / "tokenizer.model"
    if not model_path.is_file():
        raise ExportError(f"{model_path}: file not found")
    cfg_path = ckpt_dir / "tokenizer_config.json"
    cfg = _read_json(cfg_path)
    smap = _read_json(ckpt_dir / "special_tokens_map.json")
    added_ids = _read_json(ckpt_dir / "added_tokens.json")
    if not isinstance(cfg, dict) or not isinstance(smap, dict) or not isinstance(added_ids, dict):
        raise ExportError(f"{ckpt_dir}: tokenizer JSON files must hold objects")

    def special_name(key: str, required: bool = True) -> str | None:
        name = _token_name(smap.get(key)) or _token_name(cfg.get(key))
        if name is None and required:
            raise ExportError(f"{ckpt_dir / 'special_tokens_map.json'}: missing {key}")
        return name

    extra = {_token_name(t) for t in smap.get("additional_special_tokens", []) or []}
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


def read_token_ids(ckpt_dir: Path) -> dict[str, int]:
    """Return the ids of ``im_patch, bx_start, bx_end, seg, bos, eos, pad, unk`` read from a checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    added_path = ckpt_dir / "added_tokens.json"
    smap_path = ckpt_dir / "special_tokens_map.json"
    added = _read_json(added_path)
    smap = _read_json(smap_path)
    cfg_path = ckpt_dir / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    vocab = {d.get("content"): int(k) for k, d in (cfg.get("added_tokens_decoder") or {}).items()}
    vocab.update({k: int(v) for k, v in added.items()})
    ids: dict[str, int] = {}
    for key, content in (("im_patch", "<im_patch>"), ("bx_start", "<bx_start>"), ("bx_end", "<bx_end>")):
        if content not in added:
            raise ExportError(f"{added_path}: missing token {content}")
        ids[key] = int(added[content])
    if SEG_TOKEN not in added:
        raise ExportError(f"{added_path}: missing token {SEG_TOKEN}")
    ids["seg"] = int(added[SEG_TOKEN])
    sp = None
    for key in ("bos", "eos", "pad", "unk"):
        name = _token_name(smap.get(f"{key}_token")) or _token_name(cfg.get(f"{key}_token"))
        if name is None:
            raise ExportError(f"{smap_path}: missing {key}_token")
        if name in vocab:
            ids[key] = vocab[name]
            continue
        if sp is None:
            sp = _load_sp(ckpt_dir / "tokenizer.model")
        idx = sp.piece_to_id(name)
        if sp.id_to_piece(idx) != name:
            raise ExportError(f"{ckpt_dir / 'tokenizer.model'}: missing token {name} ({key}_token)")
        ids[key] = idx
    return ids


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


# ---------------------------------------------------------------------------------------------------------
# Slow reference tokenizer (transformers 4.x LlamaTokenizer semantics)
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Fast tokenizer conversion
# ---------------------------------------------------------------------------------------------------------


def _vocab_and_merges(proto: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab of all pieces and BPE merges ordered like SentencePiece's score-driven merging."""
    normal_type = type(proto.pieces[0]).NORMAL if proto.pieces else 1
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    mergeable = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == normal_type}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, idx in mergeable.items():
        score = proto.pieces[idx].score
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, mergeable[left], mergeable[right], left, right))
    ranked.sort()
    return vocab, [(left, right) for _, _, _, left, right in ranked]


def convert_tokenizer(ckpt_dir: Path) -> Tokenizer:
    """Convert a checkpoint's SentencePiece tokenizer to an equivalent ``tokenizers.Tokenizer``."""
    spec = read_tokenizer_spec(ckpt_dir)
    try:
        proto = _model_pb2().ModelProto.FromString(spec.model_path.read_bytes())
    except Exception as exc:
        raise ExportError(f"{spec.model_path}: not a SentencePiece model ({exc})") from None
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ExportError(f"{spec.model_path}: only SentencePiece BPE models are supported")
    vocab, merges = _vocab_and_merges(proto)
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=bool(proto.trainer_spec.byte_fallback),
        )
    )
    prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    if spec.legacy:
        seq = [normalizers.Replace(" ", SPIECE_UNDERLINE)]
        tok.normalizer = normalizers.Sequence(
            ([normalizers.Prepend(SPIECE_UNDERLINE)] if prefix else []) + seq
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPIECE_UNDERLINE, prepend_scheme="first" if prefix else "never", split=False
        )
    dec = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)

    base = len(vocab)
    for a in spec.added:
        if a.id >= base and a.id != tok.get_vocab_size(with_added_tokens=True):
            raise ExportError(f"{ckpt_dir}: added token {a.content} has id {a.id}, expected contiguous ids")
        if a.id < base and vocab.get(a.content) != a.id:
            raise ExportError(f"{ckpt_dir}: added token {a.content} id {a.id} disagrees with tokenizer.model")
        # normalized=False: the slow tokenizer splits on the literal text before any normalization.
        at = AddedToken(
            a.content,
            single_word=a.single_word,
            lstrip=a.lstrip,
            rstrip=a.rstrip,
            normalized=False,
            special=a.special,
        )
        if a.special:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
        if tok.token_to_id(a.content) != a.id:
            raise ExportError(f"{ckpt_dir}: added token {a.content} did not land on id {a.id}")

    bos, eos = spec.bos_token, spec.eos_token
    single = (
        ([f"{bos}:0"] if spec.add_bos_token else []) + ["$A:0"] + ([f"{eos}:0"] if spec.add_eos_token else [])
    )
    pair = (
        single
        + ([f"{bos}:1"] if spec.add_bos_token else [])
        + ["$B:1"]
        + ([f"{eos}:1"] if spec.add_eos_token else [])
    )
    specials = [
        (t, tok.token_to_id(t)) for t, used in ((bos, spec.add_bos_token), (eos, spec.add_eos_token)) if used
    ]
    if any(i is None for _, i in specials):
        raise ExportError(f"{ckpt_dir}: BOS/EOS token missing from the vocabulary")
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def write_tokenizer_json(ckpt_dir: Path, out_path: Path) -> str:
    """Convert the checkpoint's tokenizer and write ``tokenizer.json`` atomically; return its sha256."""
    tok = convert_tokenizer(ckpt_dir)
    data = tok.to_str(pretty=True).encode("utf-8")
    atomic_write_bytes(Path(out_path), data)
    return hashlib.sha256(data).hexdigest()
