"""The ``tokenizer.json`` of an M3D-LaMed checkpoint for the bundle (its token ids: :mod:`.side_files`).

The released checkpoints ship only the slow SentencePiece tokenizer (``tokenizer.model`` plus transformers
4.x JSON side files). :func:`convert_tokenizer` takes from the fast tokenizer transformers' ``AutoTokenizer``
converts the added tokens, pre-tokenizer, decoder and post-processor; it re-adds the added tokens as the slow
tokenizer matches them, on the literal text (``normalized=False``).

Deliberate forks, where transformers 5 fails the equivalence tests (its ``LlamaConverter`` fails outright for
BPE: ``SpmExtractor.extract`` is handed the vocabulary as ``model_type``):

* merges: it orders them by piece id, not score. Real Llama-2 vocabulary, ``"<im_patch>" * 256 + " What is
  liver in this image? ..."``: slow ``[..., 28705 ("▁"), ...]`` at 257, transformers 5 ``259 ("▁▁")``.
* ``legacy: true``: it ignores the flag (``Metaspace(prepend_scheme="always")`` adds no ``▁`` to a segment
  that starts with a space). Tiny llama checkpoint, ``"The liver is segmented here [SEG] and there."``: slow
  ``[..., 32003, 259, 463, 755, 2934]``, transformers 5 ``[..., 32003, 790, 755, 2934]``. We keep 4.x's
  normalizer ``Prepend("▁") + Replace(" ", "▁")``, as the real Llama-2 tokenizer.json has.

Known divergences from the slow tokenizer, shared with transformers and never produced by M3D prompts, only
for ``legacy: false``: a text that starts with whitespace, or with a *non-special* added token like ``[SEG]``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, models, normalizers

from m3d_edge.errors import ExportError
from m3d_edge.export.side_files import read_proto
from m3d_edge.fileio import atomic_write_bytes

SPIECE_UNDERLINE = "▁"


def _library_tokenizer(ckpt_dir: Path) -> Any:
    """transformers' fast tokenizer of the checkpoint, converted from ``tokenizer.model``."""
    from transformers import AutoTokenizer

    if not (ckpt_dir / "tokenizer.model").is_file():
        raise ExportError(f"{ckpt_dir / 'tokenizer.model'}: file not found")
    try:
        return AutoTokenizer.from_pretrained(str(ckpt_dir))
    except Exception as exc:  # transformers raises OSError/ValueError/RuntimeError alike
        raise ExportError(f"{ckpt_dir}: transformers cannot convert the tokenizer ({exc})") from None


def _bpe_model(model_path: Path) -> models.BPE:
    """All pieces, and the merges ordered by score as SentencePiece merges (the first fork above)."""
    proto = read_proto(model_path)
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ExportError(f"{model_path}: only SentencePiece BPE models are supported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == p.NORMAL}
    ranked = sorted(
        (-proto.pieces[i].score, normal[piece[:k]], normal[piece[k:]], piece[:k], piece[k:])
        for piece, i in normal.items()
        for k in range(1, len(piece))
        if piece[:k] in normal and piece[k:] in normal
    )
    merges = [(left, right) for *_, left, right in ranked]
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    return models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )


def convert_tokenizer(ckpt_dir: Path) -> Tokenizer:
    """Convert a checkpoint's SentencePiece tokenizer to an equivalent ``tokenizers.Tokenizer``."""
    ckpt_dir = Path(ckpt_dir)
    hf = _library_tokenizer(ckpt_dir)
    lib = hf.backend_tokenizer
    tok = Tokenizer(_bpe_model(ckpt_dir / "tokenizer.model"))
    if hf.legacy:  # the fork documented above
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
        )
    else:
        tok.pre_tokenizer = lib.pre_tokenizer
    tok.decoder = lib.decoder
    for idx, a in sorted(hf.added_tokens_decoder.items()):
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
        if tok.token_to_id(a.content) != idx:
            raise ExportError(f"{ckpt_dir}: added token {a.content} did not land on id {idx}")
    tok.post_processor = lib.post_processor
    return tok


def write_tokenizer_json(ckpt_dir: Path, out_path: Path) -> str:
    """Convert the checkpoint's tokenizer and write ``tokenizer.json`` atomically; return its sha256."""
    data = convert_tokenizer(ckpt_dir).to_str(pretty=True).encode("utf-8")
    atomic_write_bytes(Path(out_path), data)
    return hashlib.sha256(data).hexdigest()
