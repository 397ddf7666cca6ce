"""M3D-CLIP embeddings without torch: studies and texts into one space where the dot product ranks.

    r = Retriever.open("clip_bundle/")
    v = r.embed_image("ct_folder/")            # np.ndarray [768], unit length
    t = r.embed_texts(["liver lesion", "normal chest CT"])   # [2, 768]
    scores = t @ v

Studies go through the runtime's own ``load_study`` + ``preprocess`` (exactly what ``Pipeline.ask``
sees); arrays are taken as already preprocessed ``[1, 32, 256, 256]`` volumes. Texts are tokenized with
the bundle's WordPiece ``tokenizer.json``, truncated to the manifest's ``max_length`` and right-padded
within a batch with an attention mask, so a text's embedding does not depend on what it is batched with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from tokenizers import Tokenizer

from m3d_edge.bundle import ClipDims, Manifest, read_manifest
from m3d_edge.errors import BundleError, PromptError, StudyError
from m3d_edge.runtime.backend import BackendOptions, open_graph_sessions
from m3d_edge.runtime.protocols import Array, Session

if TYPE_CHECKING:
    from m3d_edge.runtime.imaging.study import Study

StudyInput = str | Path | ArrayLike  # a study path, or a volume already preprocessed
Vectors = NDArray[np.float32]

TEXT_BATCH = 32
# one ViT-B pass over a 32x256x256 volume holds 12 heads x 2049^2 float32 attention scores (~0.2 GB):
# two volumes per pass stay well inside a small machine's memory
IMAGE_BATCH = 2


@dataclass
class EmbeddedStudy:
    """A study's embedding and what an index records about it (no patient identifiers)."""

    vector: Vectors  # [D] float32, unit length
    content_hash: str  # sha256 of the preprocessed model input (float32 bytes)
    study_uid: str | None = None
    series_uid: str | None = None
    kind: str | None = None  # "dicom" | "nifti" | "npy" | "array"


def volume_hash(volume: ArrayLike) -> str:
    return hashlib.sha256(np.ascontiguousarray(volume, dtype=np.float32).tobytes()).hexdigest()


def _checked(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise PromptError("texts: expected a list of strings, got one string (use embed_text)")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise PromptError(f"text query {t!r}: expected a non-empty string")
    return list(texts)


class Retriever:
    """The torch-free M3D-CLIP runtime over one retrieval bundle."""

    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        options: BackendOptions | None = None,
        precision: str | None = None,
        max_length: int | None = None,
    ) -> None:
        if manifest.kind != "retrieval":
            raise BundleError(
                f"{bundle}: an M3D-LaMed bundle, not a retrieval bundle (export an M3D-CLIP checkpoint with"
                " `m3d-edge export`)"
            )
        if not isinstance(manifest.dims, ClipDims):
            raise BundleError(f"{bundle}: the manifest's dims are not an M3D-CLIP model's")
        self.bundle, self.manifest, self.options = bundle, manifest, options or BackendOptions()
        self.dims: ClipDims = manifest.dims
        opened = open_graph_sessions(bundle, manifest, self.options, precision)
        self.sessions: dict[str, Session] = dict(opened.sessions)
        self.precisions: dict[str, str] = opened.precisions
        self.tokenizer = Tokenizer.from_file(str(bundle / manifest.tokenizer["file"]))
        self.max_length = int(max_length or manifest.prompt.get("max_length", self.dims.max_text_len))
        if not 2 <= self.max_length <= self.dims.max_position_embeddings:
            raise PromptError(
                f"max_length {self.max_length}: must be between 2 and the text encoder's"
                f" {self.dims.max_position_embeddings} positions"
            )
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = int(manifest.token_ids.get("pad", 0))

    @classmethod
    def open(
        cls,
        bundle: Path | str,
        options: BackendOptions | None = None,
        verify: bool = True,
        precision: str | None = None,
        max_length: int | None = None,
    ) -> Retriever:
        """Load a retrieval bundle (hashes checked unless ``verify=False``) and create its two sessions.

        ``precision`` ("fp32", "int8") applies to each tower that has it; otherwise the manifest's default.
        """
        bundle = Path(bundle)
        return cls(bundle, read_manifest(bundle, verify=verify), options, precision, max_length)

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def dim(self) -> int:
        return int(self.dims.embed_dim)

    # -- images ----------------------------------------------------------------------------------
    def load_volume(self, study: StudyInput, window: str = "m3d") -> tuple[Vectors, Study | None]:
        """(model input ``[1, D, H, W]`` float32, the loaded Study or None) for a path or an array."""
        loaded: Study | None = None
        if isinstance(study, str | Path):
            from m3d_edge.runtime.imaging import load_study, preprocess

            loaded = load_study(study)
            volume, _ = preprocess(loaded, window=window)
        else:
            volume = np.asarray(study, dtype=np.float32)
        shape = tuple(self.dims.image_size)
        if volume.size != int(np.prod(shape)):
            raise StudyError(f"volume of shape {tuple(volume.shape)} is not {shape} (one channel)")
        return np.ascontiguousarray(volume.reshape(1, *shape), dtype=np.float32), loaded

    def embed_volumes(self, volumes: ArrayLike) -> Array:
        """``[N, 1, D, H, W]`` preprocessed volumes -> ``[N, dim]`` unit embeddings, in one graph run."""
        image = np.ascontiguousarray(volumes, dtype=np.float32)
        return self.sessions["image_encoder"].run({"image": image})["image_embeds"]

    def embed_image(self, study: StudyInput, window: str = "m3d") -> Array:
        """One study (path or preprocessed array) -> ``[dim]`` unit embedding."""
        volume, _ = self.load_volume(study, window)
        vector: Array = self.embed_volumes(volume[None])[0]
        return vector

    def embed_studies(
        self,
        studies: Iterable[StudyInput],
        batch_size: int = IMAGE_BATCH,
        window: str = "m3d",
        on_error: Callable[[StudyInput, Exception], None] | None = None,
    ) -> Iterator[tuple[StudyInput, EmbeddedStudy]]:
        """Yield ``(study, EmbeddedStudy)`` for each readable study, ``batch_size`` volumes per graph run.

        With ``on_error`` a study that cannot be read is reported there and skipped; without, it raises.
        """
        pending: list[tuple[StudyInput, Vectors, Study | None]] = []

        def flush() -> Iterator[tuple[StudyInput, EmbeddedStudy]]:
            vecs = self.embed_volumes(np.stack([v for _, v, _ in pending]))
            for (s, v, loaded), vec in zip(pending, vecs, strict=True):
                yield (
                    s,
                    EmbeddedStudy(
                        vector=vec,
                        content_hash=volume_hash(v),
                        study_uid=getattr(loaded, "study_instance_uid", None),
                        series_uid=getattr(loaded, "series_instance_uid", None),
                        kind=getattr(loaded, "kind", "array"),
                    ),
                )
            pending.clear()

        for s in studies:
            try:
                volume, loaded = self.load_volume(s, window)
            except StudyError as e:
                if on_error is None:
                    raise
                on_error(s, e)
                continue
            pending.append((s, volume, loaded))
            if len(pending) >= max(1, batch_size):
                yield from flush()
        if pending:
            yield from flush()

    # -- texts -----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(input_ids, attention_mask) int64 ``[N, longest]``: ``[CLS] ... [SEP]``, right-padded."""
        encs = self.tokenizer.encode_batch(_checked(texts))
        n = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), n), dtype=np.int64)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask

    def embed_texts(self, texts: Sequence[str], batch_size: int = TEXT_BATCH) -> Vectors:
        """Texts -> ``[N, dim]`` unit embeddings; batches group texts of similar length (less padding)."""
        texts = _checked(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        lengths = [len(e.ids) for e in self.tokenizer.encode_batch(_checked(texts))]
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), max(1, batch_size)):
            idx = order[start : start + batch_size]
            ids, mask = self.tokenize([texts[i] for i in idx])
            out[idx] = self.sessions["text_encoder"].run({"input_ids": ids, "attention_mask": mask})[
                "text_embeds"
            ]
        return out

    def embed_text(self, text: str) -> Vectors:
        """One text -> ``[dim]`` unit embedding."""
        vector: Vectors = self.embed_texts([text])[0]
        return vector

    def provenance(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id,
            "producer": self.manifest.producer,
            "family": self.dims.family,
            "provider": {name: s.provider for name, s in self.sessions.items()},
            "precision": dict(self.precisions),
        }


def recall_at_k(scores: ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """Recall@k both ways for a square score matrix whose diagonal holds the true pairs (M3D-Bench).

    ``scores[i, j]`` = image i . text j. ``image_to_text``: per image, is its report among the top k texts
    (rows; M3D's ``eval_itr.py`` prints this as IR_R@k); ``text_to_image``: per report, is its image among
    the top k images (columns; printed as TR_R@k). Ties rank the lower index first.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise PromptError(f"scores of shape {s.shape}: expected a non-empty square matrix")
    n = s.shape[0]
    out: dict[str, dict[int, float]] = {}
    for name, m in (("image_to_text", s), ("text_to_image", s.T)):
        rank = np.argsort(-m, axis=1, kind="stable")
        pos = np.argmax(rank == np.arange(n)[:, None], axis=1)  # where the true pair landed
        out[name] = {int(k): float(np.mean(pos < k)) for k in ks}
    return out


__all__ = ["EmbeddedStudy", "Retriever", "recall_at_k", "volume_hash"]
