"""Ray (the ``[ray]`` extra): batch over an archive on Ray Data, and the HTTP app on Ray Serve replicas.

    from m3d_edge.serve.ray import RayBatchOptions, run_ray_batch          # m3d-edge batch ... --ray auto
    from m3d_edge.serve.ray import serve_app, start                         # m3d-edge serve ... --ray auto

The batch lives in :mod:`m3d_edge.serve.ray_batch`, the Serve deployment in :mod:`m3d_edge.serve.ray_serve`.
"""

from m3d_edge.serve.ray_batch import RayBatchOptions, StudyWorker, connect, run_ray_batch
from m3d_edge.serve.ray_serve import AFFINITY_HEADER, StudyAffinity, serve_app, shared_config, start

__all__ = [
    "AFFINITY_HEADER",
    "RayBatchOptions",
    "StudyAffinity",
    "StudyWorker",
    "connect",
    "run_ray_batch",
    "serve_app",
    "shared_config",
    "start",
]
