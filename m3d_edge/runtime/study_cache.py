"""One LRU of prepared studies with a memory budget, shared by ``chat``, ``serve`` and the DICOM node.

    cache = StudyCache(budget_mb=512)
    state = cache.get(key)            # None on a miss (counted), the state on a hit (now most recent)
    cache.put(key, state)             # evicts least recently used studies until the budget holds
    cache.stats()                     # hits, misses, evictions, entries, bytes, hit_rate

An entry holds what a study costs to recompute: the model input, its image embeddings, the SegVol image
embedding and the KV cache of the last prompt (the prefix later questions reuse). Sizes are measured when
the budget is enforced, so entries that grew (a KV cache allocated after ``put``) are counted as they are
now. The most recently used entry is never evicted, even alone over budget: it is the study in use.
Thread-safe; keys are opaque strings (the pipeline's study key, derived from the study's content).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

import numpy as np

S = TypeVar("S")  # the kind of state cached (the pipeline's StudyState)

DEFAULT_BUDGET_MB = 0.0  # keep only the study in use (batch); serve and chat set their own


def state_nbytes(state: object) -> int:
    """Bytes held by one prepared study: its arrays, KV cache buffers and the loaded source volume."""
    total = 0
    hu = getattr(getattr(state, "study", None), "hu", None)
    if isinstance(hu, np.ndarray):
        total += hu.nbytes
    for name in ("image", "image_embeds", "seg_embedding"):
        arr = getattr(state, name, None)
        if isinstance(arr, np.ndarray):
            total += arr.nbytes
    cache = getattr(state, "cache", None)
    for side in getattr(cache, "buffers", None) or []:
        total += sum(b.nbytes for b in side)
    return total


class StudyCache(Generic[S]):
    """Least-recently-used studies, evicted once their bytes exceed ``budget_mb`` (0: keep only the last)."""

    def __init__(self, budget_mb: float = DEFAULT_BUDGET_MB) -> None:
        if budget_mb < 0:
            raise ValueError(f"study cache budget {budget_mb} MB: must be >= 0")
        self.budget_bytes = int(budget_mb * 2**20)
        self._entries: OrderedDict[str, S] = OrderedDict()
        self._lock = threading.RLock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> S | None:
        """The state for ``key`` (made most recent) or None; counts a hit or a miss."""
        with self._lock:
            state = self._entries.get(key)
            if state is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return state

    def put(self, key: str, state: S) -> None:
        """Store ``state`` as the most recent entry and enforce the budget."""
        with self._lock:
            self._entries[key] = state
            self._entries.move_to_end(key)
            self.enforce()

    def enforce(self) -> int:
        """Evict least recently used entries until the budget holds; returns the bytes now held."""
        with self._lock:
            sizes = {k: state_nbytes(s) for k, s in self._entries.items()}
            total = sum(sizes.values())
            while total > self.budget_bytes and len(self._entries) > 1:
                key, _ = self._entries.popitem(last=False)
                total -= sizes[key]
                self.evictions += 1
            return total

    def discard(self, key: str) -> bool:
        """Forget one study (True if it was cached)."""
        with self._lock:
            return self._entries.pop(key, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @property
    def last(self) -> S | None:
        """The most recently used state (None when empty); does not count as a hit."""
        with self._lock:
            return next(reversed(self._entries.values())) if self._entries else None

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, float]:
        with self._lock:
            asked = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "entries": len(self._entries),
                "bytes": sum(state_nbytes(s) for s in self._entries.values()),
                "budget_bytes": self.budget_bytes,
                "hit_rate": self.hits / asked if asked else 0.0,
            }
