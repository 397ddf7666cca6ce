"""Batch on Ray Data: the local batch's per-study work spread over a cluster (docs/architecture.md §2).

    from m3d_edge.serve.ray_batch import RayBatchOptions, run_ray_batch
    summary = run_ray_batch("bundle/", Path("studies"), Path("results"), {"task": "report"}, ("json",),
                            options=RayBatchOptions(address="auto", workers=4, num_gpus=1))

The driver lists the studies once (:func:`m3d_edge.jobs.discover`), holds the ``--out`` lock, and writes
``errors.jsonl`` and ``batch.json``. Each study then flows through two Ray Data stages:

1. a CPU task (``Dataset.map``): the study's content hash, the resume check against its result key
   (:func:`m3d_edge.jobs.resume.check_done`) and, when it is not done, DICOM/NIfTI read and preprocessing;
2. an actor pool (``Dataset.map_batches`` with :class:`StudyWorker`, ``concurrency`` actors, each with
   ``num_cpus``/``num_gpus`` and its own :class:`~m3d_edge.runtime.pipeline.Pipeline`): the vision graph,
   generation and :func:`m3d_edge.jobs.outputs.write_result` (atomic files, ``result.json`` last).

Same output layout, result keys, resume rules, error log and privacy mode as local batch: a study a local
batch finished is skipped here and the other way round. A worker process that dies (crash, OOM kill) is
restarted by Ray and the study is retried on the new process up to ``max_retries`` times; after that the
study is recorded as failed (:class:`~m3d_edge.errors.BackendError`, exit code 5 in ``errors.jsonl``) and
the run goes on. ``OUT`` must be a folder every node sees (a shared file system on a multi-node cluster).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3d_edge.errors import BackendError, M3DEdgeError, StudyError
from m3d_edge.fileio import atomic_write_text
from m3d_edge.jobs.batch import SUMMARY_NAME, BatchEvent, prepare_run
from m3d_edge.jobs.discovery import check_out, discover, output_folder_name
from m3d_edge.jobs.error_log import error_message, is_full, log_error, output_failure
from m3d_edge.jobs.lock import OutputLock
from m3d_edge.jobs.outputs import write_result
from m3d_edge.jobs.privacy import ENV_KEY, Privacy
from m3d_edge.jobs.resume import check_done, normalize, request_key


class Carried:
    """A value a row carries between stages as one Python object (a study, an exception), never as Arrow."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Carried) else x


@dataclass
class RayBatchOptions:
    """Where and how wide a Ray batch runs."""

    address: str | None = None  # None or "local": start a local cluster; "auto" or "ray://...": join one
    workers: int = 1  # inference actors (each opens one Pipeline)
    num_cpus: float = 1.0  # per inference actor
    num_gpus: float = 0.0  # per inference actor
    load_cpus: float = 1.0  # per loading/preprocessing task
    max_retries: int = 2  # extra attempts for a study whose worker process died
    precision: str | dict[str, str] | None = None
    threads: int = 0  # intra-op threads per graph in each actor (0: onnxruntime's default)
    provider: str = "cpu"


def connect(address: str | None) -> bool:
    """``ray.init`` unless Ray is already up in this process; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    try:
        if address in (None, "", "local"):
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise BackendError(
            f"--ray {address}: cannot start or reach a Ray cluster ({type(e).__name__})"
        ) from None
    return True


# ------------------------------------------------------------------------------------- stage 1: CPU


def load_row(row: dict[str, Any], run_key: dict[str, Any], out: str, window: str) -> dict[str, Any]:
    """Hash the study, skip it when its result is current, else read and preprocess it (a CPU task)."""
    from m3d_edge.runtime.content_key import content_key

    path, study_out = Path(row["path"]), Path(out) / row["folder"]
    row = {**row, "status": "failed", "payload": None, "note": None, "error": None, "t_load": 0.0}
    t0 = time.perf_counter()
    try:
        content = content_key(path)
        key = normalize({**run_key, "study": content})
        done, why = check_done(study_out, key)
        if done:
            return {**row, "status": "skipped"}
        from m3d_edge.runtime.imaging import load_study, preprocess

        try:
            loaded = load_study(path)
            volume, record = preprocess(loaded, window=window)
        except MemoryError:
            raise StudyError(f"{path}: out of memory reading or running this study") from None
        payload = {"content": content, "key": key, "volume": volume, "record": record, "study": loaded}
        return {
            **row,
            "status": "loaded",
            "payload": Carried(payload),
            "note": why,
            "t_load": time.perf_counter() - t0,
        }
    except Exception as exc:  # recorded by the driver, like a failure of local batch
        return {**row, "error": Carried(exc)}


# ---------------------------------------------------------------------------------- stage 2: actors


class StudyWorker:
    """An inference actor: one Pipeline, used for every study Ray Data hands it (``map_batches``)."""

    def __init__(
        self,
        bundle: str,
        options: RayBatchOptions,
        out: str,
        ask_kwargs: dict[str, Any],
        formats: tuple[str, ...],
        private: bool,
        previewer: Callable | None,
    ) -> None:
        from m3d_edge.runtime.backend import BackendOptions
        from m3d_edge.runtime.pipeline import Pipeline

        backend = BackendOptions(provider=options.provider, threads=options.threads)
        self.pipe = Pipeline.open(bundle, backend, precision=options.precision)
        self.out, self.ask_kwargs, self.formats = Path(out), ask_kwargs, formats
        self.privacy = Privacy(self.out) if private else None
        self.previewer = previewer

    def __call__(self, batch):  # a pandas DataFrame of (usually) one study
        import pandas as pd

        return pd.DataFrame([self.answer(r) for r in batch.to_dict("records")])

    def answer(self, row: dict[str, Any]) -> dict[str, Any]:
        """Answer and write one loaded study; other rows pass through without their payload."""
        payload, row = (
            _value(row.get("payload")),
            {**row, "payload": None, "has_report": False, "t_infer": 0.0},
        )
        row["pid"] = os.getpid()
        if row["status"] != "loaded":
            return row
        from m3d_edge.runtime.pipeline import files_key

        t0 = time.perf_counter()
        path, study_out = Path(row["path"]), self.out / row["folder"]
        label = row["folder"] if self.privacy else row["name"]
        try:
            state = self.pipe.adopt(
                files_key(payload["content"]), payload["volume"], payload["record"], payload["study"]
            )
            try:
                result = self.pipe.ask(path, **self.ask_kwargs)
                # the vision graph ran for this request (in adopt), as in local batch
                result.timings.update(vision=state.timings["vision"], cached_study=False)
            except MemoryError:
                raise StudyError(f"{path}: out of memory reading or running this study") from None
            finally:
                self.pipe.state = None  # a batch never asks twice: keep the actor's memory flat
            write_result(
                result,
                study_out,
                self.formats,
                key=payload["key"],
                privacy=self.privacy,
            )
            if self.previewer is not None:
                row["has_report"] = self.previewer([result], study_out, label) is not None
            row["status"] = "ok"
        except Exception as exc:
            row.update(status="failed", error=Carried(exc))
        row["t_infer"] = time.perf_counter() - t0
        return row


# ------------------------------------------------------------------------------------------ driver


def _run_key(bundle: Path, options: RayBatchOptions, ask_kwargs, formats) -> dict[str, Any]:
    """The request part of the result key, from a Pipeline opened the way every actor opens it."""
    from m3d_edge.runtime.backend import BackendOptions
    from m3d_edge.runtime.pipeline import Pipeline

    backend = BackendOptions(provider=options.provider, threads=options.threads)
    pipe = Pipeline.open(bundle, backend, precision=options.precision)
    return request_key(pipe, ask_kwargs, formats)


def run_ray_batch(
    bundle: Path | str,
    root: Path,
    out: Path,
    ask_kwargs: dict[str, Any],
    formats: tuple[str, ...],
    options: RayBatchOptions | None = None,
    on_event: Callable[[BatchEvent], None] | None = None,
    private: bool = False,
    previewer: Callable | None = None,
    run_key: dict[str, Any] | None = None,
    worker_cls: type = StudyWorker,
) -> dict[str, Any]:
    """:func:`m3d_edge.jobs.run_batch` on Ray Data; returns the summary (also written to ``batch.json``).

    ``run_key`` is the request key (:func:`m3d_edge.jobs.resume.request_key`) when the caller already
    opened a Pipeline; otherwise the bundle is opened once here to compute it, then released.
    ``worker_cls`` is the actor class (a subclass of :class:`StudyWorker`, for tests and extensions).
    """
    options = options or RayBatchOptions()
    emit = on_event or (lambda e: None)
    bundle, root, out = Path(bundle), Path(root), Path(out)
    check_out(out, root)
    studies = discover(root, exclude=out)
    if not studies:
        raise StudyError(f"{root}: no studies (subfolders, .nii, .nii.gz or .npy files) found")
    if run_key is None:
        run_key = _run_key(bundle, options, ask_kwargs, formats)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        return _run_locked(
            bundle, root, out, studies, ask_kwargs, formats, options, emit, private, previewer, run_key,
            worker_cls,
        )  # fmt: skip


def _run_locked(
    bundle, root, out, studies, ask_kwargs, formats, options, emit, private, previewer, run_key, worker_cls
):
    import ray.data
    from ray.data import DataContext

    privacy = prepare_run(out, run_key, private, emit)
    rows = []
    for i, (name, path) in enumerate(studies):
        folder = privacy.alias(name) if privacy else output_folder_name(name)
        rows.append({"index": i, "name": name, "path": str(path), "folder": folder})
    started = connect(options.address)
    ctx = DataContext.get_current()
    saved = ctx.max_errored_blocks, ctx.enable_progress_bars
    ctx.max_errored_blocks = -1  # a study whose worker died max_retries+1 times drops out; the run goes on
    ctx.enable_progress_bars = False  # ours counts studies (done, failed, remaining, studies/s)
    t_start = time.perf_counter()
    emit(BatchEvent("begin", total=len(rows)))
    try:
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one study per block and task
        ds = ds.map(
            load_row,
            fn_kwargs={"run_key": run_key, "out": str(out), "window": ask_kwargs.get("window", "m3d")},
            num_cpus=options.load_cpus,
        )
        ds = ds.map_batches(
            worker_cls,
            batch_size=1,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus or None,
            fn_constructor_kwargs={
                "bundle": str(bundle),
                "options": options,
                "out": str(out),
                "ask_kwargs": ask_kwargs,
                "formats": formats,
                "private": private,
                "previewer": previewer,
            },
            runtime_env={"env_vars": {ENV_KEY: os.environ[ENV_KEY]}} if os.environ.get(ENV_KEY) else None,
            max_restarts=-1,  # a dead worker process is replaced ...
            max_task_retries=max(0, options.max_retries),  # ... and its study retried this many times
        )
        seen: dict[int, dict[str, Any]] = {}
        for row in ds.iter_rows():
            row = _record(row, out, root, privacy, emit)
            seen[row["index"]] = row
    finally:
        ctx.max_errored_blocks, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()
    for r in rows:  # studies that never came back: every attempt lost its worker
        if r["index"] not in seen:
            exc = BackendError(
                f"{r['path']}: no result after {options.max_retries + 1} attempt(s): the worker process "
                "died on this study (or failed outside it); recorded as failed"
            )
            seen[r["index"]] = _record({**r, "status": "failed", "error": exc}, out, root, privacy, emit)
    done = [seen[r["index"]] for r in rows]
    return _summary(out, root, privacy, run_key, done, t_start, options, previewer is not None)


def _record(row: dict[str, Any], out: Path, root: Path, privacy: Privacy | None, emit) -> dict[str, Any]:
    """Log one finished study (errors.jsonl, events) and keep only what the summary needs."""
    label = row["folder"] if privacy else row["name"]
    status, report = row["status"], None
    if row.get("note"):
        emit(BatchEvent("note", label, f"{label}: {row['note']}; recomputing"))
    if status == "failed":
        exc = _value(row["error"])
        if is_full(exc):  # no later study can be written either
            raise output_failure(exc, out / row["folder"]) from None
        message = error_message(exc)
        if privacy is not None:
            message = privacy.scrub(message, Path(row["path"]), row["name"], row["folder"])
            message = message.replace(str(root), "<root>")
        log_error(out, label, exc, message)
        emit(BatchEvent("failed", label, message))
        return {"index": row["index"], "name": label, "status": "failed", "report": None, "error": message}
    if status == "skipped":
        report = f"{row['folder']}/report.html" if (out / row["folder"] / "report.html").is_file() else None
        emit(BatchEvent("skipped", label))
    else:
        report = f"{row['folder']}/report.html" if row.get("has_report") else None
        emit(BatchEvent("ok", label))
    entry = {"index": row["index"], "name": label, "status": "ok", "report": report, "error": None}
    entry["written"] = status == "ok"
    entry["seconds"] = float(row.get("t_load") or 0.0) + float(row.get("t_infer") or 0.0)
    entry["recomputed"] = bool(row.get("note"))
    return entry


def _summary(out, root, privacy, run_key, done, t_start, options, want_index) -> dict[str, Any]:
    written = [d for d in done if d.get("written")]
    seconds = [d["seconds"] for d in written]
    summary = {
        "root": None if privacy else str(root),
        "private": privacy is not None,
        "key": run_key,
        "studies": len(done),
        "ok": len(written),
        "skipped": sum(1 for d in done if d["status"] == "ok" and not d.get("written")),
        "recomputed": sum(1 for d in done if d.get("recomputed")),
        "failed": sum(1 for d in done if d["status"] == "failed"),
        "seconds": time.perf_counter() - t_start,
        "mean_seconds_per_study": sum(seconds) / len(seconds) if seconds else None,
        "engine": {"name": "ray", "workers": options.workers, "max_retries": options.max_retries},
        "entries": [{k: d[k] for k in ("name", "status", "report", "error")} for d in done],
    }
    try:
        atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        if is_full(e):
            raise output_failure(e, out / SUMMARY_NAME) from None
        raise
    if want_index:
        from m3d_edge.runtime.report import write_batch_index

        write_batch_index(summary["entries"], out)
    return summary


__all__ = ["M3DEdgeError", "RayBatchOptions", "StudyWorker", "connect", "load_row", "run_ray_batch"]
