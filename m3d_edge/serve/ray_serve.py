"""Ray Serve: the ``m3d-edge serve`` FastAPI app (:func:`m3d_edge.serve.http.create_app`) on N replicas.

    from m3d_edge.serve.ray_serve import serve_app, start
    start(serve_app(config, replicas=2), config, address="auto")     # or: m3d-edge serve --ray auto

Each replica is a Ray actor that opens its own :class:`~m3d_edge.runtime.pipeline.Pipeline` before it takes
traffic and runs the unchanged app (auth, queue, SSE, metrics). ``replicas`` fixes the count;
``min_replicas``/``max_replicas`` let Serve autoscale on requests in flight.

Session affinity: a request that carries the study id in the ``serve_multiplexed_model_id`` header is
routed by Ray Serve's model-multiplexing router to a replica that already holds that study (the study is
the "model": :class:`StudyAffinity` registers it with ``serve.multiplexed`` on first use, LRU-bounded by
``max_studies`` per replica), so the vision and SegVol encoders run once per study, not once per replica.
Why this and not a router of our own: Serve keeps the id -> replica table itself, across proxies and
autoscaling, with no extra hop. Without the header requests are spread by load; they still succeed,
because the replicas share one ``--data-dir`` (a folder every node sees) and a replica finds a study
another one stored on disk. Every answer names its replica in ``X-M3D-Replica``.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from m3d_edge.serve.config import ServeConfig

AFFINITY_HEADER = "serve_multiplexed_model_id"
APP_NAME = "m3d-edge"


class StudyAffinity:
    """ASGI wrapper run in each replica: records the request's study with Serve, names the replica."""

    def __init__(self, app: Any, max_studies: int) -> None:
        from ray import serve

        async def hold(study_id: str) -> str:  # the "model" is the study; the pipeline's LRU holds its state
            return study_id

        self.app = app
        self.hold = serve.multiplexed(max_num_models_per_replica=max_studies)(hold)
        self.name = f"{socket.gethostname()}:{os.getpid()}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from ray import serve

        study = serve.get_multiplexed_model_id()
        if study:
            await self.hold(study)

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-m3d-replica", self.name)]}
            await send(message)

        await self.app(scope, receive, named)


def serve_app(
    config: ServeConfig,
    replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_studies: int = 16,
):
    """The Serve application (bind it with :func:`start` or ``serve.run``); one model per replica."""
    from ray import serve

    def build():
        from m3d_edge.runtime.backend import BackendOptions
        from m3d_edge.runtime.pipeline import Pipeline
        from m3d_edge.serve.http import create_app

        c = config
        backend = BackendOptions(provider=c.provider, threads=c.threads)
        pipe = Pipeline.open(c.bundle, backend, c.verify_bundle, c.precision)  # before taking traffic
        return StudyAffinity(create_app(c, pipe), max_studies)

    @serve.ingress(build)
    class M3DEdgeReplica:
        """One replica: the m3d-edge HTTP app over its own Pipeline."""

    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        scale: dict[str, Any] = {
            "autoscaling_config": {
                "min_replicas": lo,
                "initial_replicas": max(lo, min(replicas, max_replicas or replicas)),
                "max_replicas": max(lo, max_replicas if max_replicas is not None else replicas),
                "target_ongoing_requests": 2,
            }
        }
    else:
        scale = {"num_replicas": replicas}
    deployment = serve.deployment(
        M3DEdgeReplica,
        name="M3DEdgeReplica",
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max(1, config.max_queue),  # the app's own queue answers 503 beyond it
        health_check_period_s=10,
        **scale,
    )
    return deployment.bind()


def shared_config(config: ServeConfig) -> tuple[ServeConfig, Path | None]:
    """``config`` with a data folder all replicas share (a new temporary one unless given) and that
    folder when this call created it (remove it when serving ends)."""
    if config.data_dir is not None:
        return config, None
    tmp = Path(tempfile.mkdtemp(prefix="m3d-edge-ray-serve-"))
    return replace(config, data_dir=tmp), tmp


def start(app, config: ServeConfig, address: str | None = None, blocking: bool = False):
    """Join or start Ray, open Serve's HTTP proxy on ``config.host:config.port`` and run ``app``."""
    from ray import serve

    from m3d_edge.serve.ray_batch import connect

    connect(address)
    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)


__all__ = ["AFFINITY_HEADER", "StudyAffinity", "serve_app", "shared_config", "start"]
