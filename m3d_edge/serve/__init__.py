"""Services over the runtime (docs/architecture.md §2): the HTTP API (``m3d-edge serve``)
and the DICOM node (``serve.dicom_node``, ``m3d-edge listen``).

    from m3d_edge.serve import ServeConfig, create_app
    app = create_app(ServeConfig(bundle=Path("bundle"), api_keys=load_api_keys(text="secret")))

Needs the ``[serve]`` extra (fastapi, uvicorn, prometheus-client); ``m3d_edge.runtime`` never imports this.
"""

from m3d_edge.serve.auth import ApiKey, load_api_keys
from m3d_edge.serve.config import ServeConfig

__all__ = ["ApiKey", "ServeConfig", "create_app", "load_api_keys"]


def __getattr__(name: str):
    if name == "create_app":  # imports fastapi only when asked for
        from m3d_edge.serve.http import create_app

        return create_app
    raise AttributeError(name)
