"""Deterministic tiny stand-ins for the tokenizer files of the released M3D-LaMed checkpoints (test fixtures).

:func:`write_tokenizer_files` writes a Llama-2-layout SentencePiece BPE ``tokenizer.model`` (32000 pieces,
trained on a seeded synthetic report-like corpus, no external data) and the transformers 4.x JSON side files
of a checkpoint of either family, as :func:`m3d_edge.export.tiny.write_tiny_checkpoint` lays them out.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

from m3d_edge.choices import FAMILIES
from m3d_edge.errors import ExportError
from m3d_edge.export.side_files import M3D_SPECIAL_TOKENS, SEG_TOKEN
from m3d_edge.fileio import atomic_write_bytes

VOCAB_SIZE = 32000
_NUM_BYTES = 256
_TRAIN_VOCAB = 3000

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

# fmt: off
_WORDS = [  # report words, in training order (repeats kept)
    "the", "a", "an", "of", "in", "on", "at", "to", "for", "with", "and", "or", "no", "not", "is", "are",
    "was", "were", "be", "been", "this", "that", "these", "those", "there", "here", "what", "where",
    "which", "who", "how", "can", "you", "please", "provide", "output", "give", "describe", "identify",
    "find", "show", "image", "scan", "volume", "mask", "segmentation", "caption", "findings", "impression",
    "medical", "report", "patient", "study", "series", "slice", "axial", "coronal", "sagittal", "liver",
    "kidney", "spleen", "pancreas", "lung", "lungs", "heart", "aorta", "bladder", "stomach", "colon",
    "bowel", "gallbladder", "brain", "chest", "abdomen", "pelvis", "spine", "bone", "rib", "vertebra",
    "adrenal", "gland", "lymph", "node", "nodes", "nodule", "nodules", "mass", "lesion", "lesions", "tumor",
    "tumour", "cyst", "cysts", "effusion", "pleural", "pericardial", "ascites", "fluid", "fracture",
    "calcification", "hypodense", "hyperdense", "enhancing", "enhancement", "contrast", "arterial",
    "venous", "phase", "ct", "mri", "pet", "ultrasound", "left", "right", "upper", "lower", "middle",
    "lobe", "segment", "bilateral", "unilateral", "diffuse", "focal", "small", "large", "multiple",
    "single", "measuring", "size", "mm", "cm", "normal", "abnormal", "unremarkable", "suspicious",
    "consistent", "likely", "possible", "evidence", "of", "metastasis", "metastases", "cancer", "carcinoma",
    "pneumonia", "emphysema", "atelectasis", "consolidation", "opacity", "ground", "glass", "thickening",
    "wall", "dilated", "obstruction", "stone", "stones", "hernia", "free", "air", "edema", "infarct",
    "hemorrhage", "bleeding", "organ", "organs", "region", "consists", "located", "within", "adjacent",
    "along", "compared", "prior", "previous", "stable", "increased", "decreased", "new", "seen", "noted",
    "demonstrates", "shows", "reveals", "suggests", "represents", "measures", "approximately", "about",
    "box", "coordinates", "answer", "question", "yes", "it", "its", "his", "her", "they", "we", "our",
    "model", "based", "on", "following", "position", "from", "into", "over", "under", "between"
]
_NON_ASCII = [
    "Läsion", "Oberlappen", "Unterlappen", "Lunge", "Leber", "Niere", "größe", "Befund", "rechts", "links",
    "über", "Größe", "été", "résumé", "naïve"
]
# fmt: on
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
