"""One question on the model thread: ask, write its files, return the JSON; and waiting for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request

from m3d_edge.errors import M3DEdgeError
from m3d_edge.serve.errors import ApiError, from_library
from m3d_edge.serve.http.schema import AskRequest, SamplingRequest
from m3d_edge.serve.http.state import ServerState
from m3d_edge.serve.metrics import Metrics
from m3d_edge.serve.uploads import StudyEntry
from m3d_edge.serve.worker import CANCEL_STATUS, Job


def ask_job(
    state: ServerState, pipe: Any, entry: StudyEntry, body: AskRequest, kwargs: dict, result_dir: Path
) -> Callable[[Job], dict[str, Any]]:
    """The function the model thread runs for one question: ask, write its files, return the JSON."""
    from m3d_edge.runtime.generate import SamplingParams

    s = body.sampling or SamplingRequest()
    metrics = state.metrics

    def run(job: Job) -> dict[str, Any]:
        params = SamplingParams(
            do_sample=s.do_sample,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            seed=s.seed,
            logit_bias=pipe.seg_bias(body.force_seg),
        )
        metrics.queue_wait.observe((job.started or time.monotonic()) - job.admitted)
        try:  # a Cancelled from on_text passes through: the worker turns it into 504/503/499
            result = pipe.ask(str(entry.input), sampling=params, on_text=job.on_text, **kwargs)
        except M3DEdgeError as exc:
            raise from_library(exc, state.scrub(entry)) from None
        _observe(metrics, job, result)
        if result.mask is None and not body.preview:
            return result.to_dict()
        return write_files(result, result_dir, body.preview)

    return run


def _observe(metrics: Metrics, job: Job, result: Any) -> None:
    """Time to first text, tokens and decode rate of one answer."""
    if job.first_text is not None and job.started is not None:
        metrics.ttft.observe(job.first_text - job.started)
    t = result.timings_dict()
    metrics.tokens.inc(len(result.tokens))
    if t["decode_tokens_per_s"]:
        metrics.decode_rate.observe(t["decode_tokens_per_s"])


def write_files(result: Any, out: Path, preview: bool) -> dict[str, Any]:
    """Mask NIfTI / DICOM SEG (and the preview) into the result folder, result.json last (atomic files)."""
    from m3d_edge.runtime.outputs import applicable_formats, write_outputs

    files = tuple(f for f in applicable_formats(result) if f != "json")  # JSON last, after the preview
    write_outputs(result, out, formats=files)
    if preview:
        from m3d_edge.runtime.report import render_montage, write_study_report

        montage = render_montage(result, out / "montage.png")
        report = write_study_report([result], out, montages=[montage])
        result.outputs.update({"montage": str(montage), "report": str(report)})
    write_outputs(result, out, formats=("json",))
    return result.to_dict(relative_to=out)


async def wait_for_result(job: Job, request: Request) -> dict[str, Any]:
    """The job's result; 504 past its deadline; a client gone away cancels it (frees its slot)."""
    fut = asyncio.wrap_future(job.future)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when nobody waits
    while True:
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            job.cancel("timeout")
            raise ApiError(*CANCEL_STATUS["timeout"])
        done, _ = await asyncio.wait({fut}, timeout=min(0.25, remaining))
        if done:
            return fut.result()
        if await request.is_disconnected():
            job.cancel("disconnect")
            raise ApiError(*CANCEL_STATUS["disconnect"])
