"""The faiss side of a retrieval index: building an exact or IVF index, searching it (faiss: ``[retrieval]``)."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from m3d_edge.runtime.retrieval_records import RetrievalIndexError

APPROX_MIN = 200_000  # vectors; at and above this the index is IVF (approximate), below exact
DEFAULT_NPROBE = 64

Vectors = NDArray[np.float32]
Ids = NDArray[np.int64]


class FaissIndex(Protocol):
    """The part of a faiss index this module uses (faiss ships no type information)."""

    ntotal: int

    def search(self, x: Vectors, k: int) -> tuple[Vectors, Ids]: ...

    def add_with_ids(self, x: Vectors, ids: Ids) -> None: ...

    def remove_ids(self, ids: Ids) -> int: ...


def faiss_module() -> ModuleType:
    """The faiss module, or :class:`RetrievalIndexError` saying how to install it."""
    try:
        import faiss
    except ImportError as e:  # the [retrieval] extra
        raise RetrievalIndexError("faiss is not installed: pip install 'm3d-edge[retrieval]'") from e
    return faiss


def faiss_search(
    index: FaissIndex, queries: Vectors, k: int, threads: int | None = None
) -> tuple[Vectors, Ids]:
    """``index.search`` with one OpenMP thread for a single query unless told otherwise.

    Fanning one query out over threads costs more than it saves, and on a busy machine far more
    (measured on 2 shared cores: 10k x 768 exact search p50 1.5 ms on one thread, 50 ms on two).
    """
    faiss = faiss_module()
    want = threads or (1 if len(queries) == 1 else None)
    if want is None:
        return index.search(queries, k)
    before: int = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(want)
    try:
        return index.search(queries, k)
    finally:
        faiss.omp_set_num_threads(before)


def is_ivf(index: FaissIndex) -> bool:
    faiss = faiss_module()
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about sqrt(n) (a power of two, at least 16), so a query's
    scan of the centroids and of its ``nprobe`` lists stay balanced (1024 lists at 1M vectors)."""
    return max(16, 1 << round(math.log2(math.sqrt(max(n, 1)))))


def build_faiss_index(
    vectors: ArrayLike, ids: ArrayLike, approximate: bool, nlist: int | None = None, seed: int = 0
) -> FaissIndex:
    """Exact ``IndexIDMap2(IndexFlatIP)``, or ``IndexIVFFlat`` (inner product) trained on a sample."""
    faiss = faiss_module()
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vecs.shape[1]
    id_arr = np.ascontiguousarray(ids, dtype=np.int64)
    index: FaissIndex
    if not approximate:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        nlist = nlist or ivf_nlist(len(vecs))
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = min(len(vecs), 64 * nlist)
        train = vecs[rng.choice(len(vecs), sample, replace=False)] if sample < len(vecs) else vecs
        ivf.cp.seed = seed
        ivf.train(train)
        ivf.nprobe = DEFAULT_NPROBE
        index = ivf
    if len(vecs):
        index.add_with_ids(vecs, id_arr)
    return index
