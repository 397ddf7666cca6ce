"""What ``m3d-edge serve`` is configured with (one dataclass; the CLI fills it from its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from m3d_edge.serve.auth import ApiKey


@dataclass
class ServeConfig:
    bundle: Path
    api_keys: list[ApiKey] = field(default_factory=list)  # empty: only with no_auth (loopback only)
    no_auth: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 8  # requests admitted to the model at once (running + waiting); more get 503
    timeout_s: float = 300.0  # a request over this (queue wait included) gets 504
    max_upload_mb: float = 1024.0
    max_unpacked_mb: float = 4096.0  # total uncompressed size of a zip upload
    max_zip_entries: int = 20000
    cache_mb: float = 2048.0  # the study LRU's memory budget
    allowed_root: Path | None = None  # server-side studies may be named by a path inside it
    data_dir: Path | None = None  # uploads and results; None: a private temporary folder, removed at exit
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    precision: str | None = None
    threads: int = 0
    provider: str = "cpu"
    grace_s: int = 20  # SIGTERM: in-flight requests get this long to finish, then they are cancelled
    retry_after_s: int = 2  # the Retry-After of a 503 when the queue is full
    verify_bundle: bool = True
