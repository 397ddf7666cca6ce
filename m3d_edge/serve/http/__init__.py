"""The HTTP API of ``m3d-edge serve``: a FastAPI app over one :class:`Pipeline` (docs/architecture.md §2).

    app = create_app(config)            # loads the bundle in the background (see /readyz)
    app = create_app(config, pipeline)  # or serve a pipeline already open

Routes (all under an API key except the health checks):
``POST /v1/studies`` (scope ``studies``) upload or name a study; ``POST /v1/studies/{id}/ask`` (``ask``) the
``Result`` JSON of ``m3d-edge run --json``, or Server-Sent Events with ``"stream": true``;
``GET /v1/studies/{id}/results/{rid}/{file}`` (``ask``); ``DELETE /v1/studies/{id}`` (``studies``);
``GET /healthz``, ``GET /readyz``; ``GET /metrics`` (``metrics``); ``GET /v1/openapi.json`` (any key).
Logs name routes, statuses and study ids, never patient data, file names, questions or keys.

Modules: ``app`` (the factory), ``schema`` (request bodies, version, result files), ``state`` (what the
routes share), ``key_guard`` (API key and scope per route), ``error_handlers``, ``access_log``,
``routes_health`` / ``routes_studies`` / ``routes_ask``, ``intake`` (storing a study), ``asking`` (one
question on the model thread), ``sse`` (streamed answers).
"""

from m3d_edge.serve.http.app import create_app

__all__ = ["create_app"]
