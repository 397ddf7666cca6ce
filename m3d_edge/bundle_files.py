"""The bundle's files: every manifest path must resolve inside the bundle, and every file the runtime
opens is hashed (sha256) and verified (docs/architecture.md §3)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3d_edge.errors import BundleError

if TYPE_CHECKING:
    from m3d_edge.bundle import Manifest

_HEX = frozenset("0123456789abcdef")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_path(bundle_dir: Path, rel: Any, what: str) -> Path:
    """``bundle_dir / rel`` when ``rel`` is a relative path that resolves inside the bundle.

    Refuses absolute paths, ``..`` and symlinks that lead out, without looking at whether the outside
    target exists (the message is the same either way).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise BundleError(f"{bundle_dir}: {what} path {rel!r} is not a bundle file name")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"{bundle_dir}: {what} path {rel!r} is outside the bundle (refused)")
    base = Path(bundle_dir).resolve()
    try:
        inside = (base / rel).resolve().is_relative_to(base)
        (base / rel).exists()  # a name the file system refuses (too long, ...) fails here, not later
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
        raise BundleError(f"{bundle_dir}: {what} path {rel[:80]!r} is not a usable file name") from None
    if not inside:
        raise BundleError(f"{bundle_dir}: {what} path {rel!r} is outside the bundle (refused)")
    return Path(bundle_dir) / rel


def check_paths(bundle_dir: Path, manifest: Manifest) -> None:
    """Every path the manifest names stays inside the bundle, and every file the runtime opens is hashed.

    A graph (or variant) whose own file has no sha256 entry is refused, so an emptied hash list cannot
    switch verification off. Raises :class:`BundleError`.
    """
    parts = [("tokenizer", manifest.tokenizer)]
    if manifest.kind != "retrieval":  # retrieval bundles embed text in their text_encoder graph
        parts.append(("embed", manifest.embed))
    for kind, part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("sha256"), str):
            raise BundleError(f"{bundle_dir}: {kind} entry has no sha256 (refused)")
        bundle_path(bundle_dir, part.get("file"), kind)
    for name, entry in manifest.graphs.items():
        if not isinstance(entry.variants, dict):
            raise BundleError(f"{bundle_dir}: variants of graph {name} are malformed")
        # (label, file, hashes) as the manifest holds them: unchecked values, checked below
        groups: list[tuple[str, Any, Any]] = [(name, entry.file, entry.sha256)]
        for prec, variant in entry.variants.items():
            if not isinstance(variant, dict):
                raise BundleError(f"{bundle_dir}: variant {name}.{prec} is malformed")
            groups.append((f"{name}.{prec}", variant.get("file"), variant.get("sha256")))
            if variant.get("report") is not None:
                bundle_path(bundle_dir, variant["report"], f"{name}.{prec} report")
                if variant["report"] not in (variant.get("sha256") or {}):
                    raise BundleError(f"{bundle_dir}: report of {name}.{prec} has no sha256 (refused)")
        for label, file, hashes in groups:
            bundle_path(bundle_dir, file, f"graph {label}")
            if not isinstance(hashes, dict) or file not in hashes:
                raise BundleError(f"{bundle_dir}: graph {label} ({file}) has no sha256 (refused)")
            for rel, digest in hashes.items():
                bundle_path(bundle_dir, rel, f"hash entry of {label}")
                if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
                    raise BundleError(f"{bundle_dir}: hash entry {rel!r} of {label} is not a sha256")


def graph_files(manifest: Manifest) -> list[tuple[str, dict[str, str]]]:
    """(model file, {file: sha256} of that graph) for every graph and variant."""
    out = []
    for entry in manifest.graphs.values():
        out.append((entry.file, entry.sha256))
        out += [(v["file"], v.get("sha256", {})) for v in entry.variants.values()]
    return out


def manifest_files(manifest: Manifest) -> dict[str, str]:
    """Every file the manifest vouches for, with its expected sha256."""
    files = {manifest.tokenizer["file"]: manifest.tokenizer["sha256"]}
    if manifest.embed:  # retrieval bundles have no embedding table
        files[manifest.embed["file"]] = manifest.embed["sha256"]
    for entry in manifest.graphs.values():
        files.update(entry.sha256)
        for variant in entry.variants.values():
            files.update(variant.get("sha256", {}))
    return files


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Check presence and sha256 of every file; one message lists every problem."""
    from m3d_edge.onnx_external import external_data_locations

    check_paths(bundle_dir, manifest)
    problems = []
    for rel, expected in sorted(manifest_files(manifest).items()):
        p = bundle_dir / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(p) != expected:
            problems.append(f"{rel} is corrupted (sha256 mismatch)")
    if problems:
        raise BundleError(f"{bundle_dir}: " + "; ".join(problems))
    for file, hashes in graph_files(manifest):  # the files ONNX Runtime will open beside the model
        folder = str(Path(file).parent)
        for loc in sorted(external_data_locations(bundle_dir / file)):
            rel = loc if folder == "." else f"{folder}/{loc}"
            bundle_path(bundle_dir, rel, f"external data of {file}")
            if rel not in hashes:
                raise BundleError(
                    f"{bundle_dir}: {file} reads external data {loc!r} that is not hashed (refused)"
                )
