"""``m3d-edge serve``: the HTTP API (m3d_edge.serve) under uvicorn, with its TLS and graceful shutdown."""

from __future__ import annotations

import copy
import ipaddress
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import typer

from m3d_edge.cli import ray as _ray  # --ray/--replicas (Ray Serve)
from m3d_edge.cli.common import handle_errors, note, open_pipeline
from m3d_edge.cli.options import (
    BundleArg,
    Precision,
    PrecisionOpt,
    Provider,
    ProviderOpt,
    ThreadsOpt,
    epilog,
    value,
)
from m3d_edge.errors import PromptError

commands = typer.Typer()  # merged into the main app by m3d_edge.cli.app

EXAMPLES = (
    "m3d-edge serve ./bundle --api-key-file ./keys.txt",
    "M3D_EDGE_API_KEYS=$(openssl rand -hex 24) m3d-edge serve ./bundle --port 8080 --cache-mb 4096",
    "m3d-edge serve ./bundle --api-key-file keys.txt --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem",
    "m3d-edge serve ./bundle --api-key-file keys.txt --allowed-root /data/studies --max-queue 16",
    "m3d-edge serve ./bundle --api-key-file keys.txt --ray auto --replicas 4 --data-dir /shared/m3d",
)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_config() -> dict:
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["loggers"]["m3d_edge.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return cfg


@commands.command("serve", epilog=epilog(*EXAMPLES))
@handle_errors
def serve(
    bundle: Path = BundleArg,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    api_key_file: Path | None = typer.Option(
        None,
        "--api-key-file",
        help="API keys, one per line: KEY, optionally followed by scopes studies,ask,metrics; or M3D_EDGE_API_KEYS.",
    ),
    max_queue: int = typer.Option(8, "--max-queue", min=1, help="Requests admitted at once; more get 503."),
    max_upload_mb: float = typer.Option(1024, "--max-upload-mb", min=0.001, help="Largest upload (MB)."),
    max_unpacked_mb: float = typer.Option(
        4096, "--max-unpacked-mb", min=0.001, help="Largest total size a zip upload may unpack to (MB)."
    ),
    max_zip_entries: int = typer.Option(
        20000, "--max-zip-entries", min=1, help="Most entries in a zip upload."
    ),
    cache_mb: float = typer.Option(2048, "--cache-mb", min=0, help="Memory budget of the study cache (MB)."),
    allowed_root: Path | None = typer.Option(
        None, "--allowed-root", help="Let clients name server-side studies inside this folder."
    ),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="TLS certificate (PEM); with --tls-key."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="TLS private key (PEM)."),
    precision: Precision | None = PrecisionOpt,
    threads: int = ThreadsOpt,
    provider: Provider = ProviderOpt,
    timeout: float = typer.Option(300, "--timeout", min=0.1, help="Seconds a request may take (504 after)."),
    grace: int = typer.Option(20, "--grace", min=0, help="SIGTERM: seconds in-flight requests may finish."),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="Keep uploads and results here (default: a temporary folder, removed at exit).",
    ),
    cors_origin: list[str] | None = typer.Option(
        None, "--cors-origin", help="Allow this browser origin (repeatable); CORS is off without it."
    ),
    no_auth: bool = typer.Option(False, "--no-auth", help="No API keys (refused unless bound to loopback)."),
    ray_address: str | None = _ray.RayOpt,
    replicas: int = _ray.ReplicasOpt,
    min_replicas: int | None = _ray.MinReplicasOpt,
    max_replicas: int | None = _ray.MaxReplicasOpt,
) -> None:
    """Serve the bundle over HTTP: upload studies, ask questions (JSON or streamed), fetch masks and reports.

    One model per process; requests run in order on a bounded queue (503 + Retry-After when full). Every
    route but /healthz and /readyz needs an API key (Authorization: Bearer KEY or X-API-Key: KEY).
    """
    try:
        import uvicorn

        from m3d_edge.serve.http import create_app
    except ImportError as exc:
        raise PromptError(
            f"m3d-edge serve needs the serve extra ({exc.name} is missing): pip install 'm3d-edge[serve]'"
        ) from None
    from m3d_edge.serve.config import ServeConfig

    _check_paths(tls_cert, tls_key, allowed_root)
    keys = _api_keys(api_key_file, no_auth, host)
    if not _loopback(host) and tls_cert is None:
        note(f"warning: serving plain HTTP on {host}; API keys and studies cross the network unencrypted")
    config = ServeConfig(
        bundle=bundle,
        api_keys=keys,
        no_auth=no_auth,
        host=host,
        port=port,
        max_queue=max_queue,
        timeout_s=timeout,
        max_upload_mb=max_upload_mb,
        max_unpacked_mb=max_unpacked_mb,
        max_zip_entries=max_zip_entries,
        cache_mb=cache_mb,
        allowed_root=allowed_root,
        data_dir=data_dir,
        tls_cert=tls_cert,
        tls_key=tls_key,
        cors_origins=list(cors_origin or []),
        precision=value(precision),
        threads=threads,
        provider=value(provider),
        grace_s=grace,
    )
    if ray_address is not None:  # Ray Serve replicas, each opening its own model (m3d_edge.serve.ray_serve)
        return _ray.serve_on_ray(config, ray_address, replicas, min_replicas, max_replicas)
    pipe = open_pipeline(bundle, precision, threads, provider)  # a bad bundle fails here, exit 4
    _run_uvicorn(uvicorn, create_app(config, pipe), config)


def _check_paths(tls_cert: Path | None, tls_key: Path | None, allowed_root: Path | None) -> None:
    if (tls_cert is None) != (tls_key is None):
        raise PromptError("--tls-cert and --tls-key go together")
    for p in (tls_cert, tls_key):
        if p is not None and not p.is_file():
            raise PromptError(f"{p}: no such file")
    if allowed_root is not None and not allowed_root.is_dir():
        raise PromptError(f"--allowed-root {allowed_root}: not a folder")


def _api_keys(api_key_file: Path | None, no_auth: bool, host: str) -> list:
    """The keys of --api-key-file and M3D_EDGE_API_KEYS; none only with --no-auth on loopback."""
    from m3d_edge.serve.auth import keys_from_env, read_key_file

    keys = []
    if api_key_file is not None:
        keys, warning = read_key_file(api_key_file)
        if warning:
            note(f"warning: {warning}")
    keys += keys_from_env()
    if not keys and not no_auth:
        raise PromptError(
            "no API keys: give --api-key-file FILE or set M3D_EDGE_API_KEYS (or --no-auth on loopback)"
        )
    if no_auth and not _loopback(host):
        raise PromptError(f"--no-auth is only allowed on a loopback address, not {host}")
    return keys


def _run_uvicorn(uvicorn: Any, app: Any, config: Any) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, draining in-flight requests within ``config.grace_s``."""
    state, grace = app.state.m3d, config.grace_s

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """SIGTERM/SIGINT: admit nothing new; in-flight requests may finish within the grace period,
            then they are cancelled (streams end with an ``error`` event), before uvicorn cuts connections."""
            if not self.should_exit:
                state.worker.begin_close()
                timer = threading.Timer(max(0.0, grace - 1.0), state.worker.cancel_all)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        access_log=False,  # the app logs its own access lines (no query strings)
        log_config=_log_config(),
        ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
        ssl_keyfile=str(config.tls_key) if config.tls_key else None,
        timeout_graceful_shutdown=grace,
        server_header=False,
        proxy_headers=False,
    )
    # uvicorn re-raises the signal it shut down on; after a graceful shutdown that means exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    Server(uv).run()
