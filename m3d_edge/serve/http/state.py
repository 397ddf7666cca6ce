"""What the routes share: config, pipeline (None until loaded), studies, model worker, metrics."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from m3d_edge.errors import M3DEdgeError
from m3d_edge.serve.config import ServeConfig
from m3d_edge.serve.errors import ApiError
from m3d_edge.serve.metrics import Metrics
from m3d_edge.serve.uploads import StudyEntry, StudyStore
from m3d_edge.serve.worker import ModelWorker

log = logging.getLogger("m3d_edge.serve")


class ServerState:
    """What the routes share: config, pipeline (None until loaded), studies, model worker, metrics."""

    def __init__(self, config: ServeConfig, pipeline: Any | None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.load_error: str | None = None
        self.owns_data = config.data_dir is None
        data = Path(tempfile.mkdtemp(prefix="m3d-edge-serve-")) if self.owns_data else Path(config.data_dir)
        self.data_dir = data
        self.store = StudyStore(data)
        self.metrics = Metrics(self.cache_stats, lambda: self.worker.depth)
        self.worker = ModelWorker(
            config.max_queue, config.retry_after_s, lambda reason: self.metrics.cancelled.labels(reason).inc()
        )
        self.uploads = asyncio.Semaphore(2)  # studies read at once (each holds a volume in memory)
        if pipeline is not None:
            self._adopt(pipeline)

    def _adopt(self, pipeline: Any) -> None:
        from m3d_edge.runtime.study_cache import StudyCache

        pipeline.studies = StudyCache(self.config.cache_mb)
        self.pipeline = pipeline

    def load(self) -> None:
        """Open and verify the bundle (run in a thread at startup when no pipeline was given)."""
        from m3d_edge.runtime.backend import BackendOptions
        from m3d_edge.runtime.pipeline import Pipeline

        c = self.config
        try:
            pipe = Pipeline.open(
                c.bundle, BackendOptions(provider=c.provider, threads=c.threads), c.verify_bundle, c.precision
            )
        except M3DEdgeError as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("bundle not loaded: %s", type(exc).__name__)
            return
        self._adopt(pipe)
        log.info("bundle %s ready", pipe.manifest.bundle_id)

    def cache_stats(self) -> dict[str, float]:
        return self.pipeline.studies.stats() if self.pipeline is not None else {}

    def ready(self) -> Any:
        if self.worker.closing:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        if self.pipeline is None:
            raise ApiError(503, "not_ready", self.load_error or "the bundle is still loading")
        return self.pipeline

    def scrub(self, entry: StudyEntry) -> dict[str, str]:
        """Server paths -> neutral names, for error messages sent to clients."""
        return {str(entry.input): "study", str(entry.folder): "study", str(self.data_dir): "data"}

    def cleanup(self) -> None:
        if self.owns_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
