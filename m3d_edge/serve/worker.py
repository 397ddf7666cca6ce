"""One model, one worker thread: a bounded FIFO of jobs, each cancellable at its next token.

    worker = ModelWorker(max_queue=8)
    job = worker.submit(fn, timeout_s=300, stream=True)   # ApiError 503 (+ Retry-After) when full
    ... fn(job) runs on the model thread and passes job.on_text to Pipeline.ask ...
    job.cancel("disconnect")                              # the generation stops at its next token

``max_queue`` bounds the requests admitted at once (the one running plus those waiting); they run in the
order admitted. A job cancelled while waiting is skipped when its turn comes; a running one raises
:class:`Cancelled` from its ``on_text`` callback at the next token (or at its deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from m3d_edge.serve.errors import ApiError

DONE = object()  # end of a job's stream of text deltas
CANCEL_STATUS = {  # why a job stopped -> (HTTP status, code, message)
    "timeout": (504, "timeout", "the request ran over its time limit"),
    "shutdown": (503, "shutting_down", "the server is shutting down"),
    "disconnect": (499, "client_disconnected", "the client went away"),
}


class Cancelled(Exception):
    """Raised inside a job that must stop: ``reason`` is disconnect, timeout or shutdown."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)  # hashable by identity
class Job:
    fn: Callable[[Job], Any]
    deadline: float  # time.monotonic() after which it is cancelled with "timeout"
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue | None = None  # text deltas, then DONE (streaming jobs)
    admitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_text: float | None = None
    reason: str | None = None  # why it was cancelled
    future: Future = field(default_factory=Future)

    def cancel(self, reason: str) -> None:
        self.reason = self.reason or reason

    def check(self) -> None:
        if self.reason is None and time.monotonic() > self.deadline:
            self.reason = "timeout"
        if self.reason is not None:
            raise Cancelled(self.reason)

    def on_text(self, delta: str) -> None:
        """The ``on_text`` callback of ``Pipeline.ask``: forwards a delta, or stops the generation."""
        self.check()
        if self.first_text is None:
            self.first_text = time.monotonic()
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, delta)


class ModelWorker:
    def __init__(
        self, max_queue: int, retry_after_s: int = 2, on_cancel: Callable[[str], None] | None = None
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.max_queue, self.retry_after_s, self.on_cancel = max_queue, retry_after_s, on_cancel
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3d-model")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self.closing = False

    @property
    def depth(self) -> int:
        """Admitted jobs not yet finished (running + waiting)."""
        return len(self._jobs)

    def submit(self, fn: Callable[[Job], Any], timeout_s: float, stream: bool = False) -> Job:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.closing:
                raise ApiError(503, "shutting_down", "the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise ApiError(
                    503,
                    "queue_full",
                    f"{len(self._jobs)} requests are queued (limit {self.max_queue}); retry later",
                    {"Retry-After": str(self.retry_after_s)},
                )
            job = Job(fn, time.monotonic() + timeout_s, loop, asyncio.Queue() if stream else None)
            self._jobs.add(job)
        inner = self._executor.submit(self._run, job)
        inner.add_done_callback(lambda f: self._finish(job, f))
        return job

    def _run(self, job: Job) -> Any:
        """Run one job; a :class:`Cancelled` (before or during the run) becomes its ApiError."""
        try:
            job.check()  # cancelled or out of time while waiting: skip it
            job.started = time.monotonic()
            return job.fn(job)
        except Cancelled as exc:
            if self.on_cancel is not None:
                self.on_cancel(exc.reason)
            raise ApiError(*CANCEL_STATUS[exc.reason]) from None

    def _finish(self, job: Job, inner: Future) -> None:
        with self._lock:
            self._jobs.discard(job)
        exc = inner.exception()
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(inner.result())
        if job.events is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed (shutdown)
                job.loop.call_soon_threadsafe(job.events.put_nowait, DONE)

    def run_in_order(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the model thread after the admitted jobs, outside the queue limit (deletes)."""
        return self._executor.submit(fn)

    def begin_close(self) -> None:
        """Admit nothing more; jobs already admitted may finish."""
        with self._lock:
            self.closing = True

    def cancel_all(self, reason: str = "shutdown") -> None:
        """Cancel every admitted job: waiting ones are skipped, running ones stop at their next token."""
        with self._lock:
            self.closing = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel(reason)

    def close(self) -> None:
        """Cancel every job and wait for the model thread to end."""
        self.cancel_all()
        self._executor.shutdown(wait=True, cancel_futures=False)
