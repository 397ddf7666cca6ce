"""Study + question -> answer, box and mask, stitched from the bundle's graphs (docs/architecture.md §4).

    pipe = Pipeline.open("bundle/")
    result = pipe.ask("ct_folder/", task="segment", target="liver")
    print(result.text, result.box, result.mask.shape)

Per study the image embeddings, the SegVol image embedding and the KV cache of the last prompt are kept
in an LRU with a memory budget (``pipe.studies``, :mod:`m3d_edge.runtime.study_cache`), so further
questions on a recent study pay neither encoder again and reuse the shared prompt prefix.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from tokenizers import Tokenizer

from m3d_edge.bundle import Manifest, ModelDims, kv_names, read_manifest
from m3d_edge.errors import BackendError, BundleError, GenerationError, PromptError, StudyError
from m3d_edge.runtime.backend import BackendOptions, GraphSession, open_graph_sessions
from m3d_edge.runtime.generate import Decoder, SamplingParams, generate
from m3d_edge.runtime.prompts import (
    SEG_FORCE_BIAS,
    SEG_TOKEN,
    build_prompt,
    parse_box,
    prompt_separator,
    question_for,
    resolve_prompt_format,
)
from m3d_edge.runtime.protocols import Array, Cache, DecoderBackend, Graph, Session
from m3d_edge.runtime.result import Result
from m3d_edge.runtime.study_cache import StudyCache

if TYPE_CHECKING:
    from m3d_edge.runtime.imaging.preprocess import PreprocessRecord
    from m3d_edge.runtime.imaging.study import Study

StudyInput = str | Path | ArrayLike  # a study path, or a volume already on the model grid

CACHE_ROUND = 256  # KV cache sizes are rounded up to this, so a chat rarely regrows it


@dataclass
class StudyState:
    """What the pipeline remembers about one study between questions."""

    key: str
    image: NDArray[np.float32]  # [1, 1, D, H, W] float32 in [0, 1]
    image_embeds: Array  # [1, N, H]
    record: PreprocessRecord | None = None  # the imaging geometry record, when the study came from a file
    study: Study | None = None  # the loaded study (for writing outputs on its grid)
    seg_embedding: Array | None = None
    cache: Cache | None = None
    timings: dict[str, float] = field(default_factory=dict)


def files_key(content: str) -> str:
    """The cache key of a study read from files whose ``content_key`` is ``content``."""
    return f"files:{content}"


def _study_key(study: StudyInput) -> str:
    """Identity of a study for the per-study cache: a hash of its files' content, or the array's content."""
    if isinstance(study, str | Path):
        from m3d_edge.runtime.content_key import content_key

        path = Path(study)
        return files_key(content_key(path)) if path.exists() else f"files:{path.resolve()}"
    data = np.ascontiguousarray(study, dtype=np.float32)
    return f"array:{data.shape}:{hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()}"


def load_embed_table(path: Path) -> NDArray[np.floating[Any]]:
    """The bundle's embedding table, memory-mapped; never unpickles (an object array is refused)."""
    try:
        table: object = np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as e:
        raise BundleError(f"{path}: unreadable ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # "Object arrays cannot be loaded when allow_pickle=False", a bad header
        raise BundleError(f"{path}: not a plain numeric .npy table ({type(e).__name__})") from None
    if not isinstance(table, np.ndarray) or table.ndim != 2 or table.dtype.kind != "f":
        raise BundleError(f"{path}: expected a 2-D float table")
    return table


def load_tokenizer(path: Path) -> Tokenizer:
    """``tokenizer.json`` as a fast tokenizer; a file the library cannot parse is a :class:`BundleError`."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type with serde text
        raise BundleError(f"{path}: not a valid tokenizer.json ({type(e).__name__})") from None


ON_DEMAND_GRAPHS = frozenset({"seg_encoder", "seg_decoder"})
"""Graphs opened on first use: only segmentation runs them, and at full size they hold 0.5 GB."""


class Pipeline:
    """The torch-free M3D-LaMed runtime over one bundle."""

    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        options: BackendOptions,
        precision: str | dict[str, str] | None = None,
    ) -> None:
        if manifest.kind != "lamed":  # a retrieval (M3D-CLIP) bundle: runtime.retrieval.Retriever opens it
            raise BundleError(
                f"{bundle}: a {manifest.kind} bundle (M3D-CLIP); use `m3d-edge search` / Retriever"
            )
        if not isinstance(manifest.dims, ModelDims):
            raise BundleError(f"{bundle}: the manifest's dims are not an M3D-LaMed model's")
        self.bundle, self.manifest, self.options = bundle, manifest, options
        self.dims: ModelDims = manifest.dims
        self.embed_table = load_embed_table(bundle / manifest.embed["file"])
        if tuple(self.embed_table.shape) != (self.dims.vocab_size, self.dims.hidden_size):
            raise BundleError(
                f"{bundle / manifest.embed['file']}: shape {self.embed_table.shape} does not match the manifest"
            )
        self.tokenizer = load_tokenizer(bundle / manifest.tokenizer["file"])
        self.precision_requested = precision if isinstance(precision, str) else None
        self.precision_fallbacks: dict[str, str] = {}  # graph -> what runs instead of the asked precision
        if options.provider == "trt":
            self._open_engines(precision)
        else:
            self._open_sessions(precision)
        ids = manifest.token_ids
        self.seg_id, self.eos_ids = int(ids["seg"]), {int(i) for i in ids["eos"]}
        self.studies: StudyCache[StudyState] = (
            StudyCache()
        )  # by content key; the default budget keeps the last study only

    def _open_sessions(self, precision: str | dict[str, str] | None) -> None:
        """ONNX Runtime sessions, each graph at the precision asked for or the manifest's default."""
        if isinstance(precision, str):  # a precision no graph has is refused, never run as another one
            have = {p for g in self.manifest.graphs.values() for p in (g.precision, *g.variants)}
            if precision not in have:
                raise BundleError(
                    f"{self.bundle}: no graph has a {precision} variant (this bundle has "
                    f"{', '.join(sorted(have))}); `m3d-edge calibrate BUNDLE --data DIR` writes INT8/INT4 variants"
                )
        opened = open_graph_sessions(
            self.bundle, self.manifest, self.options, precision, on_demand=ON_DEMAND_GRAPHS
        )
        self.sessions: dict[str, Graph] = dict(opened.sessions)
        self.precisions, self.precision_fallbacks = opened.precisions, opened.fallbacks
        decoder = opened.sessions["decoder"]
        if not isinstance(decoder, GraphSession):  # ON_DEMAND_GRAPHS never holds it: it runs bound buffers
            raise BackendError("decoder: the decoder loop needs an opened session, not an on-demand one")
        # the cache type is the backend's own (KVCache here, TrtKVCache there): the pipeline only hands
        # back what decoder.new_cache made
        cache = decoder.spec.input_dtype(kv_names(0)[0])
        self.decoder: DecoderBackend[Any] = Decoder(decoder, self.dims, self.embed_table, cache)

    def _open_engines(self, precision: str | dict[str, str] | None) -> None:
        """Native TensorRT plans built by ``m3d-edge build-engines`` for this GPU (KV cache on the device)."""
        from m3d_edge.runtime.trt_backend import open_engines

        want = precision if isinstance(precision, str) else "fp16"
        sessions, self.decoder, _ = open_engines(
            self.bundle,
            want,
            self.dims,
            self.manifest.tensorrt_specs(),
            self.embed_table,
            self.options.device_id,
        )
        self.sessions = {**sessions, "decoder": self.decoder}
        self.precisions = dict.fromkeys(self.manifest.specs(), want)

    @classmethod
    def open(
        cls,
        bundle: Path | str,
        options: BackendOptions | None = None,
        verify: bool = True,
        precision: str | dict[str, str] | None = None,
    ) -> Pipeline:
        """Load a bundle (hashes checked unless ``verify=False``) and create its sessions.

        ``precision`` overrides the manifest's choice: one name ("fp32", "int8", "int4") applies to every
        graph that has it, a dict names it per graph (and must exist there).
        """
        bundle = Path(bundle)
        return cls(bundle, read_manifest(bundle, verify=verify), options or BackendOptions(), precision)

    # -- studies ---------------------------------------------------------------------------------
    @property
    def state(self) -> StudyState | None:
        """The most recently used study (setting one caches it; setting None forgets every study)."""
        return self.studies.last

    @state.setter
    def state(self, value: StudyState | None) -> None:
        if value is None:
            self.studies.clear()
        else:
            self.studies.put(value.key, value)

    def forget(self, study: StudyInput) -> bool:
        """Drop a study's cached state (call before its files are removed); True if it was cached."""
        return self.studies.discard(_study_key(study))

    def prepare(
        self, study: StudyInput, window: str = "m3d", series: str | None = None, allow_resample: bool = False
    ) -> StudyState:
        """Load and preprocess a study (path or array) and run the vision graph, once per study.

        ``series`` and ``allow_resample`` are passed to :func:`~m3d_edge.runtime.imaging.load_study`.
        """
        key = _study_key(study)
        if series is not None or allow_resample:
            key += f"|series={series}|resample={allow_resample}"
        state = self.studies.get(key)
        if state is not None:
            return state
        loaded: Study | None = None
        record: PreprocessRecord | None = None
        if isinstance(study, str | Path):
            from m3d_edge.runtime.imaging import load_study, preprocess

            loaded = load_study(study, series=series, allow_resample=allow_resample)
            volume, record = preprocess(loaded, window=window)
        else:
            volume = np.asarray(study, dtype=np.float32)
        return self.adopt(key, volume, record, loaded, study if isinstance(study, str | Path) else "array")

    def adopt(
        self,
        key: str,
        volume: NDArray[np.floating[Any]],
        record: PreprocessRecord | None = None,
        loaded: Study | None = None,
        where: str | Path = "array",
    ) -> StudyState:
        """Run the vision graph on a study preprocessed elsewhere (e.g. a Ray CPU task) and cache it.

        ``key`` is the study's cache key (``files_key(content_key(path))`` for a study read from files).
        """
        if volume.size != np.prod(self.dims.image_size):
            raise StudyError(f"{where}: volume of shape {volume.shape} is not {self.dims.image_size}")
        image = np.ascontiguousarray(volume.reshape(1, 1, *self.dims.image_size), dtype=np.float32)
        t0 = time.perf_counter()
        embeds = self._run("vision", {"image": image})["image_embeds"]
        state = StudyState(key, image, embeds, record, loaded, timings={"vision": time.perf_counter() - t0})
        self.studies.put(key, state)
        return state

    def _run(self, graph: str, inputs: dict[str, Array]) -> dict[str, Array]:
        """Run one of the graphs that take and give named tensors (every graph but the TensorRT decoder)."""
        session = self.sessions[graph]
        if not isinstance(session, Session):
            raise BackendError(f"{graph}: this backend runs it only through the decoder loop")
        return session.run(inputs)

    def seg_embedding(self, state: StudyState) -> Array:
        if state.seg_embedding is None:
            t0 = time.perf_counter()
            state.seg_embedding = self._run("seg_encoder", {"image": state.image})["image_embedding"]
            state.timings["seg_encoder"] = time.perf_counter() - t0
        return state.seg_embedding

    # -- prompts ---------------------------------------------------------------------------------
    def prompt_ids(self, question: str, space: bool = True) -> list[int]:
        p = self.manifest.prompt
        text = build_prompt(question, p["image_token"], p["num_image_tokens"], space)
        return self.tokenizer.encode(text).ids

    def embed(self, ids: list[int], image_embeds: Array) -> NDArray[np.float32]:
        """Token embeddings with positions ``splice_start ..`` replaced by the image features (M3D's splice)."""
        embeds: NDArray[np.float32] = self.embed_table[np.asarray(ids)][None].astype(np.float32)
        start, n = int(self.manifest.prompt["splice_start"]), image_embeds.shape[1]
        embeds[:, start : start + n] = image_embeds
        return embeds

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- asking ----------------------------------------------------------------------------------
    def ask(
        self,
        study: StudyInput,
        question: str | None = None,
        *,
        task: str | None = None,
        target: str | None = None,
        choices: list[str] | None = None,
        box: tuple[float, ...] | None = None,
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        stop_strings: tuple[str, ...] = (),
        on_text: Callable[[str], None] | None = None,
        window: str = "m3d",
        prompt_format: str = "auto",
        series: str | None = None,
        allow_resample: bool = False,
    ) -> Result:
        """Answer one question on a study; ``task`` picks a preset (see ``TASKS``), else ``question`` is used.

        ``prompt_format``: ``auto`` (task presets in M3D's training format, free questions as M3D's demo
        scripts build them, with no space), ``demo`` or ``train`` for every prompt (see
        :mod:`m3d_edge.runtime.prompts`). ``series``/``allow_resample``: see :meth:`prepare`.
        """
        t_start = time.perf_counter()
        fmt = resolve_prompt_format(task, prompt_format)
        separator = prompt_separator(task, fmt)
        if task is not None:
            question = question_for(task, target if target is not None else question, choices, box)
        if not question:
            raise PromptError("no question given (pass a question or a task)")
        misses = self.studies.misses
        state = self.prepare(study, window, series=series, allow_resample=allow_resample)
        cached = self.studies.misses == misses
        ids = self.prompt_ids(question, separator == " ")
        embeds = self.embed(ids, state.image_embeds)
        max_new = int(max_new_tokens or self.manifest.generation["max_new_tokens"])
        needed, limit = len(ids) + max_new, self.dims.context_length
        if needed > limit:
            raise GenerationError(
                f"prompt of {len(ids)} tokens + max_new_tokens {max_new} exceeds the model's context length {limit}"
            )
        if state.cache is None or state.cache.max_len < needed:
            state.cache = self.decoder.new_cache(min(limit, -(-needed // CACHE_ROUND) * CACHE_ROUND))
            self.studies.enforce()  # the study grew by its KV cache
        gen = generate(
            self.decoder,
            state.cache,
            embeds,
            ids,
            max_new_tokens=max_new,
            eos_ids=self.eos_ids,
            params=sampling,
            stop_strings=stop_strings,
            decode=self.decode,
            on_text=on_text,
            keep_hidden=True,
        )
        text = self.decode(gen.tokens)
        # encoder times count only when this call ran the encoder (0 when the study's features were reused)
        timings = {
            "vision": 0.0 if cached else state.timings["vision"],
            "prefill": gen.prefill_seconds,
            "decode_steps": gen.step_seconds,
            "cached_study": cached,
        }
        mask, seg_hidden = None, self.seg_hidden(gen.tokens, gen.hidden)
        if seg_hidden is not None:
            seg_cached = state.seg_embedding is not None
            emb = self.seg_embedding(state)
            t0 = time.perf_counter()
            logits = self._run("seg_decoder", {"image_embedding": emb, "seg_hidden": seg_hidden[None]})
            timings["seg_encoder"] = 0.0 if seg_cached else state.timings["seg_encoder"]
            timings["seg_decoder"] = time.perf_counter() - t0
            mask = logits["mask_logits"][0, 0] > 0.0  # sigmoid(x) > 0.5
        timings["total"] = time.perf_counter() - t_start
        return Result(
            question=question,
            task=task,
            text=text,
            tokens=gen.tokens,
            stop_reason=gen.stop_reason,
            box=parse_box(self.decode(gen.tokens, skip_special_tokens=False)),
            mask=mask,
            timings=timings,
            provenance=self.provenance(),
            volume=state.image[0, 0],
            study=state.study,
            record=state.record,
            target=target,
            prompt={"format": fmt, "separator": separator, "tokens": len(ids)},
        )

    def seg_hidden(self, tokens: list[int], hidden: list[NDArray[np.float32]]) -> NDArray[np.float32] | None:
        """M3D's rule: mean hidden state of the positions that predicted [SEG], skipping the first token."""
        picks = [hidden[k] for k in range(1, len(tokens)) if tokens[k] == self.seg_id]
        if not picks:
            return None
        mean: NDArray[np.float32] = np.mean(picks, axis=0).astype(np.float32)
        return mean

    def seg_bias(self, force: bool = True) -> dict[int, float]:
        """The logit bias that makes the answer contain [SEG] (so a mask is produced), or none."""
        return {self.seg_id: SEG_FORCE_BIAS} if force else {}

    def provenance(self) -> dict[str, Any]:
        return {
            "bundle_id": self.manifest.bundle_id,
            "producer": self.manifest.producer,
            "family": self.dims.family,
            "provider": {name: s.provider for name, s in self.sessions.items()},
            "precision": dict(self.precisions),
            **({"precision_requested": self.precision_requested} if self.precision_requested else {}),
            **({"precision_fallback": dict(self.precision_fallbacks)} if self.precision_fallbacks else {}),
        }


__all__ = ["SEG_TOKEN", "Pipeline", "Result", "SamplingParams"]
