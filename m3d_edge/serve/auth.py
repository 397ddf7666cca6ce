"""API keys: parsed from a file or an environment variable, checked in constant time, scoped per route.

Key file format, one key per line (``#`` starts a comment)::

    3f9c...e1                      # every scope
    77ab...90  ask                 # a viewer: ask questions and fetch result files
    c0de...42  metrics             # a Prometheus scraper

Scopes: ``studies`` (upload, delete), ``ask`` (ask, result files), ``metrics`` (/metrics, the OpenAPI
document needs any valid key). Keys are compared as SHA-256 digests with :func:`secrets.compare_digest`,
against every configured key (no early exit), and are never logged.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from m3d_edge.errors import PromptError

SCOPES = ("studies", "ask", "metrics")
ENV_VAR = "M3D_EDGE_API_KEYS"
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class ApiKey:
    digest: bytes  # sha256 of the key; the key itself is not kept
    scopes: frozenset[str]
    label: str  # "key N" (its line), safe to log


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_api_keys(text: str, origin: str = "keys") -> list[ApiKey]:
    """Parse key lines (see the module docstring); raises PromptError naming the origin and line."""
    keys: list[ApiKey] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, *rest = line.split(None, 1)
        given = (rest[0] if rest else "").replace(",", " ").split()
        scopes = frozenset(given) or frozenset(SCOPES)
        bad = sorted(scopes - set(SCOPES))
        if bad:
            raise PromptError(
                f"{origin} line {n}: unknown scope(s) {', '.join(bad)} (use {', '.join(SCOPES)})"
            )
        if len(key) < MIN_KEY_LENGTH:
            raise PromptError(f"{origin} line {n}: a key must have at least {MIN_KEY_LENGTH} characters")
        keys.append(ApiKey(_digest(key), scopes, f"key {n}"))
    return keys


def read_key_file(path: Path) -> tuple[list[ApiKey], str | None]:
    """Keys from a file, and a warning when others than its owner can read it."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise PromptError(f"{path}: cannot read the API key file ({exc.strerror})") from None
    keys = load_api_keys(text, str(path))
    if not keys:
        raise PromptError(f"{path}: no API keys in the file")
    warn = f"{path}: readable by group/others; chmod 600 it" if mode & (stat.S_IRGRP | stat.S_IROTH) else None
    return keys, warn


def keys_from_env() -> list[ApiKey]:
    """Keys from ``M3D_EDGE_API_KEYS`` (same syntax as the file; ``;`` also separates entries)."""
    text = os.environ.get(ENV_VAR, "")
    return load_api_keys(text.replace(";", "\n"), ENV_VAR) if text.strip() else []


def match_key(presented: str | None, keys: list[ApiKey]) -> ApiKey | None:
    """The configured key equal to ``presented``, compared in constant time against all of them."""
    if not presented:
        return None
    digest, found = _digest(presented), None
    for k in keys:
        if secrets.compare_digest(digest, k.digest):
            found = k
    return found
