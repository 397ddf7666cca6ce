"""Server-Sent Events of one streamed answer: ``text`` deltas, then ``result`` or ``error``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.sse import format_sse_event

from m3d_edge.serve.errors import ApiError
from m3d_edge.serve.worker import CANCEL_STATUS, DONE, Job

log = logging.getLogger("m3d_edge.serve")


def _event(name: str, payload: Any) -> bytes:
    return format_sse_event(data_str=json.dumps(payload), event=name)


async def stream_events(job: Job) -> AsyncIterator[bytes]:
    """Server-Sent Events of one job: text deltas, then the result or an error; cancels on disconnect."""
    try:
        while True:
            remaining = job.deadline - time.monotonic()
            try:
                item = await asyncio.wait_for(job.events.get(), timeout=max(remaining, 0.0) + 0.1)
            except TimeoutError:
                job.cancel("timeout")
                yield _event("error", ApiError(*CANCEL_STATUS["timeout"]).body())
                return
            if item is DONE:
                break
            yield _event("text", {"text": item})
        yield _final_event(job)
    finally:
        if not job.future.done():
            job.cancel("disconnect")


def _final_event(job: Job) -> bytes:
    """The ``result`` event of a finished job, or its ``error``."""
    try:
        result = job.future.result()
    except ApiError as exc:
        return _event("error", exc.body())
    except Exception as exc:
        log.error("unexpected %s in a stream", type(exc).__name__)
        return _event("error", ApiError(500, "internal_error", f"unexpected {type(exc).__name__}").body())
    return _event("result", result)
