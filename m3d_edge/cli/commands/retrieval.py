"""``m3d-edge index build|add|remove|info``, ``m3d-edge search`` and ``m3d-edge eval-retrieval`` (M3D-CLIP).

The work is done by
:mod:`m3d_edge.runtime.retrieval` (embeddings) and :mod:`m3d_edge.runtime.retrieval_index` (faiss + SQLite).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from m3d_edge.cli.common import EXIT_BATCH_PARTIAL, backend_options, console, handle_errors, note
from m3d_edge.cli.options import ThreadsOpt, epilog
from m3d_edge.errors import PromptError, StudyError
from m3d_edge.jobs import discover
from m3d_edge.jobs.error_log import log_error
from m3d_edge.jobs.privacy import ENV_FLAG, private_enabled

index_app = typer.Typer(
    help="Build and maintain an M3D-CLIP study index (faiss + SQLite) for `m3d-edge search`.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

commands = typer.Typer()  # merged into the main app by m3d_edge.cli.app
commands.add_typer(index_app, name="index")

BundleArg = typer.Argument(..., help="Retrieval bundle (an exported M3D-CLIP).", show_default=False)
IndexArg = typer.Argument(..., help="Index folder written by `m3d-edge index build`.", show_default=False)
BundleOpt = typer.Option(
    None, "--bundle", help="Retrieval bundle (default: the one that built the index).", show_default=False
)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _open_retriever(bundle: Path, threads: int = 0, max_length: int | None = None):
    from m3d_edge.runtime.retrieval import Retriever

    return Retriever.open(bundle, backend_options("cpu", threads), max_length=max_length)


def _index_and_retriever(index: Path, bundle: Path | None, threads: int = 0):
    from m3d_edge.runtime.retrieval_index import StudyIndex

    idx = StudyIndex.open(index)
    bundle = bundle or idx.bundle_path
    if bundle is None:
        raise PromptError(f"{index}: the index does not record its bundle; pass --bundle")
    r = _open_retriever(bundle, threads)
    idx.check_bundle(r.bundle_id, bundle)
    return idx, r


def embed_into(idx, r, studies: list[tuple[str, Path]], batch_size: int, label: str) -> dict[str, int]:
    """Embed ``(name, path)`` studies not yet in ``idx`` and add each in its own transaction.

    Studies already indexed (same source) are skipped, so a killed run resumes where it stopped; a study
    that cannot be read is logged to ``INDEX/errors.jsonl`` and skipped.
    """
    from m3d_edge.runtime.retrieval_index import Record, source_key

    keys = {str(p): source_key(p) for _, p in studies}
    todo = [(n, p) for n, p in studies if idx.has_source(keys[str(p)]) is None]
    names = {str(p): n for n, p in todo}
    counts = {"indexed": 0, "skipped": len(studies) - len(todo), "failed": 0}

    def failed(path: Any, exc: Exception) -> None:
        counts["failed"] += 1
        name = f"source:{keys[str(path)][:16]}" if idx.privacy else names[str(path)]
        if idx.privacy:  # messages name the source path: keep only the kind of failure
            exc = StudyError(
                f"{name}: study unreadable ({type(exc).__name__}; details withheld, private mode)"
            )
        log_error(idx.path, name, exc)
        console.print(Text("failed ", style="red").append(" ".join(str(exc).split())), soft_wrap=True)

    progress = _progress()
    with progress:
        bar = progress.add_task(label, total=len(todo))
        for path, emb in r.embed_studies([p for _, p in todo], batch_size=batch_size, on_error=failed):
            rec = Record(
                source_key=keys[str(path)],
                content_hash=emb.content_hash,
                name=names[str(path)],
                source_path=str(Path(path).resolve()),
                study_uid=emb.study_uid,
                series_uid=emb.series_uid,
                kind=emb.kind,
            )
            idx.add([rec], emb.vector[None], sync=False)
            counts["indexed"] += 1
            progress.advance(bar)
        progress.update(bar, completed=len(todo))
    idx.sync()
    return counts


def _summary(idx, counts: dict[str, int], title: str) -> None:
    table = Table(title=title)
    table.add_column("studies")
    table.add_column("count", justify="right")
    table.add_row("[green]indexed now[/green]", str(counts["indexed"]))
    table.add_row("already indexed (skipped)", str(counts["skipped"]))
    table.add_row("[red]failed[/red]" if counts["failed"] else "failed", str(counts["failed"]))
    table.add_row("in the index", str(len(idx)))
    console.print(table)
    if counts["failed"]:
        note(f"{counts['failed']} failed; see {idx.path / 'errors.jsonl'} (rerun to retry them)", "red")
        raise typer.Exit(EXIT_BATCH_PARTIAL)


def tiny_clip(out: Path, family: str = "clip", preset: str = "tiny", seed: int = 0, **_: Any) -> Path:
    """``tiny-checkpoint --family clip``: a random-weight M3D-CLIP folder (presets tiny, bench)."""
    from m3d_edge.export.tiny_clip import PRESETS, write_tiny_clip_checkpoint

    if preset not in PRESETS:
        raise PromptError(f"--preset {preset}: M3D-CLIP has presets {', '.join(PRESETS)}")
    return write_tiny_clip_checkpoint(out, preset=preset, seed=seed)


# ------------------------------------------------------------------------------------------ index


@index_app.command(
    "build",
    epilog=epilog(
        "m3d-edge index build ./clip_bundle ./studies -o ./index",
        "m3d-edge index build ./clip_bundle ./studies -o ./index --private   # no names or paths stored",
    ),
)
@handle_errors
def index_build(
    bundle: Path = BundleArg,
    root: Path = typer.Argument(
        ..., help="Folder with one study per subfolder (or .nii/.nii.gz/.npy files).", show_default=False
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Index folder to write (or resume).", show_default=False
    ),
    privacy: bool = typer.Option(
        False,
        "--private",
        help=f"Privacy mode (also {ENV_FLAG}=1): store no study names or source paths, only UIDs and hashes.",
    ),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Volumes per image-encoder run."),
    approx_min: int | None = typer.Option(
        None, "--approx-min", help="Use an approximate (IVF) index from this many vectors (default 200000)."
    ),
    threads: int = ThreadsOpt,
) -> None:
    """Embed every study under ROOT into an index; rerun the same command to resume a stopped build.

    Exit code 0 when every study is indexed, 10 when some failed (see INDEX/errors.jsonl).
    """
    from m3d_edge.runtime.retrieval_index import APPROX_MIN, StudyIndex

    privacy = private_enabled(privacy)
    studies = discover(root)
    if not studies:
        raise StudyError(f"{root}: no studies (subfolders, .nii, .nii.gz or .npy files) found")
    r = _open_retriever(bundle, threads)
    idx = StudyIndex.create(
        out, r.bundle_id, r.dim, bundle_path=bundle, privacy=privacy, approx_min=approx_min or APPROX_MIN
    )
    if privacy != idx.privacy:
        note(f"{out}: the index was created {'with' if idx.privacy else 'without'} --private; keeping that")
    (idx.path / "errors.jsonl").unlink(missing_ok=True)  # this run's failures only, as batch does
    counts = embed_into(idx, r, studies, batch_size, "index build")
    _summary(idx, counts, f"index {out}: {len(studies)} studies under {root}")


def _study_name(path: Path) -> str:
    """The name ``index build`` gives a study: the folder name, or the file name without its suffix."""
    low = path.name.lower()
    suffix = next((x for x in (".nii.gz", ".nii", ".npy") if low.endswith(x)), "")
    return path.name[: len(path.name) - len(suffix)] if path.is_file() and suffix else path.name


@index_app.command("add", epilog=epilog("m3d-edge index add ./index ./new_ct_folder ./other.nii.gz"))
@handle_errors
def index_add(
    index: Path = IndexArg,
    studies: list[Path] = typer.Argument(..., help="Studies to add (folders or files).", show_default=False),
    bundle: Path | None = BundleOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Add studies to an index (ones already in it are skipped)."""
    idx, r = _index_and_retriever(index, bundle, threads)
    missing = [s for s in studies if not s.exists()]
    if missing:
        raise StudyError(f"{missing[0]}: no such file or folder")
    items = [(_study_name(s), s) for s in studies]
    _summary(idx, embed_into(idx, r, items, 2, "index add"), f"index {index}")


@index_app.command("remove", epilog=epilog("m3d-edge index remove ./index 17 1.2.840.113619.2.55.3.604688"))
@handle_errors
def index_remove(
    index: Path = IndexArg,
    ids: list[str] = typer.Argument(
        ..., help="Index ids, study names, Study or Series Instance UIDs.", show_default=False
    ),
) -> None:
    """Remove studies from an index."""
    from m3d_edge.runtime.retrieval_index import StudyIndex

    idx = StudyIndex.open(index)
    wanted = idx.resolve(ids)
    removed = idx.remove(wanted)
    absent = sorted(set(wanted) - set(removed))
    console.print(f"removed {len(removed)} (ids {', '.join(map(str, removed)) or '-'}); {len(idx)} left")
    if absent:
        raise PromptError(f"{index}: no indexed study with id {', '.join(map(str, absent))}")


@index_app.command("info", epilog=epilog("m3d-edge index info ./index --json"))
@handle_errors
def index_info(index: Path = IndexArg, as_json: bool = typer.Option(False, "--json")) -> None:
    """What an index holds: bundle, size, exact or approximate."""
    from m3d_edge.runtime.retrieval_index import StudyIndex

    idx = StudyIndex.open(index)
    info = {
        "index": str(index),
        "studies": len(idx),
        "bundle_id": idx.bundle_id,
        "bundle_path": str(idx.bundle_path) if idx.bundle_path else None,
        "dim": idx.dim,
        "privacy": idx.privacy,
        "faiss": type(idx.faiss_index()).__name__,
        "generation": idx.generation,
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    for k, v in info.items():
        console.print(f"{k:12} {v}")


# ------------------------------------------------------------------------------------------ search


def read_lines(path: Path) -> list[str]:
    """Candidate reports: one per non-empty line."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: cannot read the candidate reports ({e})") from e
    lines = [ln for ln in lines if ln]
    if not lines:
        raise PromptError(f"{path}: no candidate reports (expected one report per line)")
    return lines


@commands.command(
    "search",
    epilog=epilog(
        'm3d-edge search ./index --text "large liver lesion" --top-k 5',
        "m3d-edge search ./index --study ./ct_folder --json",
        "m3d-edge search ./index --study ./ct_folder --reports ./candidate_reports.txt",
    ),
)
@handle_errors
def search(
    index: Path = IndexArg,
    text: str | None = typer.Option(None, "--text", help="Find studies matching this text."),
    study: Path | None = typer.Option(
        None, "--study", help="Find studies like this one (or rank --reports)."
    ),
    reports: Path | None = typer.Option(
        None, "--reports", help="With --study: rank these candidate reports (one per line) instead."
    ),
    top_k: int = typer.Option(10, "--top-k", "-k", min=1, help="How many results."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    bundle: Path | None = BundleOpt,
    nprobe: int | None = typer.Option(None, "--nprobe", min=1, help="IVF lists to scan (approximate index)."),
    threads: int = ThreadsOpt,
) -> None:
    """Text-to-image, image-to-image or image-to-text search over an index.

    Give exactly one of --text or --study. With --study and --reports the candidate reports are ranked
    for the study (what M3D-Bench's image-text retrieval measures).
    """
    if (text is None) == (study is None):
        raise PromptError('give exactly one of --text "..." or --study PATH')
    if reports is not None and study is None:
        raise PromptError("--reports ranks reports for a study: give --study PATH with it")
    if text is not None and not text.strip():
        raise PromptError("--text is empty")
    idx, r = _index_and_retriever(index, bundle, threads)
    query: dict[str, Any] = {"text": text} if text is not None else {"study": str(study)}
    if reports is not None:
        lines = read_lines(reports)
        scores = r.embed_texts(lines) @ r.embed_image(study)
        order = np.argsort(-scores, kind="stable")[:top_k]
        rows = [
            {"rank": k + 1, "line": int(i) + 1, "score": float(scores[i]), "report": lines[i]}
            for k, i in enumerate(order)
        ]
        _show(
            rows,
            {**query, "reports": str(reports)},
            r.bundle_id,
            as_json,
            ("rank", "score", "line", "report"),
        )
        return
    q = r.embed_text(text) if text is not None else r.embed_image(study)
    hits = idx.search(q, top_k, nprobe=nprobe)[0]
    rows = [{"rank": k + 1, **h.to_dict()} for k, h in enumerate(hits)]
    cols = ("rank", "score", "id", "name", "study_uid", "series_uid")
    _show(rows, query, r.bundle_id, as_json, cols)


def _show(rows: list[dict[str, Any]], query: dict[str, Any], bundle_id: str, as_json: bool, cols) -> None:
    if as_json:
        console.print_json(json.dumps({"query": query, "bundle_id": bundle_id, "results": rows}))
        return
    table = Table(title=" ".join(f"{k}={v}" for k, v in query.items()))
    for c in cols:
        table.add_column(c, justify="right" if c in ("rank", "score", "id", "line") else "left")
    for row in rows:
        table.add_row(*(f"{row[c]:.4f}" if c == "score" else str(row.get(c) or "-") for c in cols))
    console.print(table)


# ------------------------------------------------------------------------------------------ eval


@commands.command(
    "eval-retrieval",
    epilog=epilog(
        "m3d-edge eval-retrieval ./clip_bundle ./pairs.jsonl",
        "m3d-edge eval-retrieval ./clip_bundle ./M3D_Cap.json --split test --max-length 512 --json",
    ),
)
@handle_errors
def eval_retrieval(
    bundle: Path = BundleArg,
    pairs: Path = typer.Argument(
        ..., help="Pairs file: .json (M3D-Cap style), .jsonl, .csv or .tsv.", show_default=False
    ),
    split: str | None = typer.Option(None, "--split", help="Split of a JSON pairs file (e.g. test)."),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="Base of relative paths (default: beside PAIRS)."
    ),
    max_length: int | None = typer.Option(
        None,
        "--max-length",
        help="Tokens per report (default: the bundle's, 128; M3D-Bench's script uses 512).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    threads: int = ThreadsOpt,
) -> None:
    """Recall@1/5/10 image-to-text and text-to-image over (study, report) pairs, as M3D-Bench computes it."""
    from m3d_edge.runtime.retrieval_eval import evaluate_pairs, read_pairs

    items = read_pairs(pairs, split, data_root)
    r = _open_retriever(bundle, threads, max_length)
    if as_json:  # stdout holds only the JSON
        result = evaluate_pairs(r, items)
    else:
        progress = _progress()
        with progress:
            bar = progress.add_task("embedding studies", total=len(items))
            result = evaluate_pairs(r, items, progress=lambda n: progress.update(bar, completed=n))
    if as_json:
        console.print_json(json.dumps(result))
        return
    table = Table(title=f"{len(items)} pairs, bundle {r.bundle_id}")
    table.add_column("direction")
    for k in (1, 5, 10):
        table.add_column(f"R@{k}", justify="right")
    for d in ("image_to_text", "text_to_image"):
        table.add_row(d.replace("_", " "), *(f"{result[d][k]:.3f}" for k in (1, 5, 10)))
    console.print(table)
