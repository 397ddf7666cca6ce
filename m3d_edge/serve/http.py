"""The HTTP API of ``m3d-edge serve``: a FastAPI app over one :class:`Pipeline` (docs/architecture.md §2).

    app = create_app(config)            # loads the bundle in the background (see /readyz)
    app = create_app(config, pipeline)  # or serve a pipeline already open

Routes (all under an API key except the health checks):
``POST /v1/studies`` (scope ``studies``) upload or name a study; ``POST /v1/studies/{id}/ask`` (``ask``) the
``Result`` JSON of ``m3d-edge run --json``, or Server-Sent Events with ``"stream": true``;
``GET /v1/studies/{id}/results/{rid}/{file}`` (``ask``); ``DELETE /v1/studies/{id}`` (``studies``);
``GET /healthz``, ``GET /readyz``; ``GET /metrics`` (``metrics``); ``GET /v1/openapi.json`` (any key).
Logs name routes, statuses and study ids, never patient data, file names, questions or keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from m3d_edge.errors import M3DEdgeError, PromptError
from m3d_edge.serve.auth import match_key
from m3d_edge.serve.config import ServeConfig
from m3d_edge.serve.errors import ApiError, from_library
from m3d_edge.serve.metrics import Metrics
from m3d_edge.serve.uploads import (
    RESULT_ID,
    StudyEntry,
    StudyStore,
    check_nifti_size,
    extract_zip,
    hash_path,
    receive_body,
    sniff,
)
from m3d_edge.serve.worker import CANCEL_STATUS, DONE, Job, ModelWorker

log = logging.getLogger("m3d_edge.serve")

API_VERSION = "v1"
RESULT_FILES = {  # route name -> (file written in the result folder, media type)
    "mask.nii.gz": ("result_mask.nii.gz", "application/gzip"),
    "seg.dcm": ("result_seg.dcm", "application/dicom"),
    "montage.png": ("montage.png", "image/png"),
    "report.html": ("report.html", "text/html; charset=utf-8"),
    "result.json": ("result.json", "application/json"),
}


# ------------------------------------------------------------------------------------------ requests


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None


class AskRequest(BaseModel):
    """One question: a task preset (with target/question/choices/box) or a free question."""

    model_config = ConfigDict(extra="forbid")
    task: str | None = None
    target: str | None = Field(None, max_length=500)
    question: str | None = Field(None, max_length=4000)
    choices: list[str] | None = Field(None, max_length=4)
    box: list[float] | None = Field(None, min_length=6, max_length=6)
    max_new_tokens: int | None = Field(None, ge=1)
    sampling: SamplingRequest | None = None
    stream: bool = False
    timeout_s: float | None = Field(None, gt=0, description="A shorter time limit than the server's.")
    preview: bool = Field(False, description="Also write montage.png and report.html.")
    force_seg: bool = Field(False, description="Bias [SEG] by +40 (random-weight test models).")

    def ask_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``Pipeline.ask``; raises PromptError (400) for a bad task request."""
        from m3d_edge.runtime.prompts import question_for

        box = tuple(self.box) if self.box is not None else None
        if self.task is None:
            if not (self.question and self.question.strip()):
                raise PromptError("give a task (with target/question) or a free question")
        else:
            question_for(
                self.task, self.target if self.target is not None else self.question, self.choices, box
            )
        return {
            "question": self.question,
            "task": self.task,
            "target": self.target if self.task is not None else None,
            "choices": list(self.choices) if self.choices else None,
            "box": box,
            "max_new_tokens": self.max_new_tokens,
        }


class PathRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., max_length=4096)


# ------------------------------------------------------------------------------------------ the app


class ServerState:
    """What the routes share: config, pipeline (None until loaded), studies, model worker, metrics."""

    def __init__(self, config: ServeConfig, pipeline: Any | None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.load_error: str | None = None
        self.owns_data = config.data_dir is None
        data = Path(tempfile.mkdtemp(prefix="m3d-edge-serve-")) if self.owns_data else Path(config.data_dir)
        self.data_dir = data
        self.store = StudyStore(data)
        self.metrics = Metrics(self.cache_stats, lambda: self.worker.depth)
        self.worker = ModelWorker(
            config.max_queue, config.retry_after_s, lambda reason: self.metrics.cancelled.labels(reason).inc()
        )
        self.uploads = asyncio.Semaphore(2)  # studies read at once (each holds a volume in memory)
        if pipeline is not None:
            self._adopt(pipeline)

    def _adopt(self, pipeline: Any) -> None:
        from m3d_edge.runtime.study_cache import StudyCache

        pipeline.studies = StudyCache(self.config.cache_mb)
        self.pipeline = pipeline

    def load(self) -> None:
        """Open and verify the bundle (run in a thread at startup when no pipeline was given)."""
        from m3d_edge.runtime.backend import BackendOptions
        from m3d_edge.runtime.pipeline import Pipeline

        c = self.config
        try:
            pipe = Pipeline.open(
                c.bundle, BackendOptions(provider=c.provider, threads=c.threads), c.verify_bundle, c.precision
            )
        except M3DEdgeError as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("bundle not loaded: %s", type(exc).__name__)
            return
        self._adopt(pipe)
        log.info("bundle %s ready", pipe.manifest.bundle_id)

    def cache_stats(self) -> dict[str, float]:
        return self.pipeline.studies.stats() if self.pipeline is not None else {}

    def ready(self) -> Any:
        if self.worker.closing:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        if self.pipeline is None:
            raise ApiError(503, "not_ready", self.load_error or "the bundle is still loading")
        return self.pipeline

    def scrub(self, entry: StudyEntry) -> dict[str, str]:
        """Server paths -> neutral names, for error messages sent to clients."""
        return {str(entry.input): "study", str(entry.folder): "study", str(self.data_dir): "data"}

    def cleanup(self) -> None:
        if self.owns_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def create_app(config: ServeConfig, pipeline: Any | None = None) -> FastAPI:
    """The FastAPI application; the bundle is opened in the background unless ``pipeline`` is given."""
    if not config.api_keys and not config.no_auth:
        raise PromptError("no API keys configured: give --api-key-file FILE or set M3D_EDGE_API_KEYS")
    state = ServerState(config, pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.pipeline is None:
            threading.Thread(target=state.load, name="m3d-load", daemon=True).start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.worker.close)
            state.cleanup()
            log.info("stopped")

    app = FastAPI(
        title="m3d-edge",
        version=API_VERSION,
        summary="M3D-LaMed on the edge: ask questions about CT studies.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind a key
    )
    app.state.m3d = state

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["X-Result-Id", "Retry-After"],
        )
    app.add_middleware(_AccessLog, metrics=state.metrics)

    # -- errors: every refusal is JSON with a stable code --------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(M3DEdgeError)
    async def _library_error(request: Request, exc: M3DEdgeError) -> JSONResponse:
        return _error_response(from_library(exc))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        return _error_response(ApiError(400, "bad_request", "; ".join(parts) or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        route = getattr(request.scope.get("route"), "path", "unmatched")
        log.error("unexpected %s on %s", type(exc).__name__, route)
        return _error_response(ApiError(500, "internal_error", f"unexpected {type(exc).__name__}"))

    # -- auth ------------------------------------------------------------------------------------------
    def require(scope: str | None):
        async def check(request: Request) -> None:
            if config.no_auth:
                return
            key = match_key(_api_key(request), config.api_keys)
            if key is None:
                raise ApiError(
                    401, "unauthorized", "missing or unknown API key", {"WWW-Authenticate": "Bearer"}
                )
            if scope is not None and scope not in key.scopes:
                raise ApiError(403, "forbidden", f"this API key is not allowed the {scope!r} routes")

        return Depends(check)

    # -- health ----------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> dict:
        pipe = state.ready()
        return {"status": "ready", "bundle_id": pipe.manifest.bundle_id, "verified": config.verify_bundle}

    @app.get("/metrics", tags=["health"], dependencies=[require("metrics")])
    async def metrics() -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.get(f"/{API_VERSION}/openapi.json", include_in_schema=False, dependencies=[require(None)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    # -- studies ---------------------------------------------------------------------------------------
    @app.post(f"/{API_VERSION}/studies", tags=["studies"], status_code=201, dependencies=[require("studies")])
    async def upload_study(request: Request) -> JSONResponse:
        """Upload a study as the raw body (zip of DICOM, .nii, .nii.gz, M3D .npy, one DICOM file), or send
        ``{"path": "..."}`` (JSON) to name one inside the server's allowed root. Same bytes, same id."""
        async with state.uploads:
            if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
                entry, created = await _add_path(state, request)
            else:
                entry, created = await _add_upload(state, request)
        log.info("study %s %s (%s)", entry.study_id, "added" if created else "known", entry.kind)
        body = {"study_id": entry.study_id, "created": created, **entry.info}
        return JSONResponse(body, status_code=201 if created else 200)

    @app.get(f"/{API_VERSION}/studies/{{study_id}}", tags=["studies"], dependencies=[require("ask")])
    async def get_study(study_id: str) -> dict:
        entry = state.store.get(study_id)
        return {"study_id": entry.study_id, "created": False, **entry.info}

    @app.delete(f"/{API_VERSION}/studies/{{study_id}}", tags=["studies"], dependencies=[require("studies")])
    async def delete_study(study_id: str) -> dict:
        entry = state.store.get(study_id)

        def forget() -> None:  # on the model thread, after the questions already queued
            if state.pipeline is not None and entry.input.exists():
                state.pipeline.forget(entry.input)
            state.store.delete(study_id)

        await asyncio.wrap_future(state.worker.run_in_order(forget))
        return {"study_id": study_id, "deleted": True}

    # -- asking ----------------------------------------------------------------------------------------
    @app.post(f"/{API_VERSION}/studies/{{study_id}}/ask", tags=["ask"], dependencies=[require("ask")])
    async def ask(study_id: str, body: AskRequest, request: Request) -> Response:
        """The ``Result`` JSON (as ``m3d-edge run --json``); with ``"stream": true`` Server-Sent Events:
        ``event: text`` per delta (``{"text": ...}``), then ``event: result`` (or ``event: error``)."""
        pipe = state.ready()
        entry = state.store.get(study_id)
        kwargs = body.ask_kwargs()
        result_id, result_dir = state.store.result_dir(entry)
        fn = _ask_job(state, pipe, entry, body, kwargs, result_dir)
        limit = min(config.timeout_s, body.timeout_s or config.timeout_s)
        job = state.worker.submit(fn, limit, stream=body.stream)
        headers = {"X-Result-Id": result_id}
        if body.stream:
            headers["Cache-Control"] = "no-store"
            return StreamingResponse(_sse(job, state), media_type="text/event-stream", headers=headers)
        result = await _wait(job, request, state)
        return JSONResponse(result, headers=headers)

    @app.get(
        f"/{API_VERSION}/studies/{{study_id}}/results/{{result_id}}/{{name}}",
        tags=["ask"],
        dependencies=[require("ask")],
    )
    async def result_file(study_id: str, result_id: str, name: str) -> FileResponse:
        entry = state.store.get(study_id)
        if name not in RESULT_FILES:
            raise ApiError(404, "unknown_file", f"no result file {name!r} (one of {', '.join(RESULT_FILES)})")
        file, media = RESULT_FILES[name]
        path = entry.results / result_id / file
        if not RESULT_ID.match(result_id) or not path.is_file():
            raise ApiError(404, "unknown_result", f"result {result_id!r} has no {name}")
        headers = {"Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"}
        return FileResponse(path, media_type=media, headers=headers)

    return app


# ------------------------------------------------------------------------------------------ intake


async def _add_upload(state: ServerState, request: Request) -> tuple[StudyEntry, bool]:
    c, store = state.config, state.store
    staged = store.scratch()
    try:
        blob = staged / "upload.bin"
        study_id, head = await receive_body(request, blob, int(c.max_upload_mb * 2**20))
        if study_id in store.entries:
            return store.entries[study_id], False
        kind = sniff(head)
        if kind is None:
            raise ApiError(415, "unsupported_media_type", "upload is not a zip, NIfTI, .npy or DICOM file")
        if kind in ("zip", "dicom"):
            folder = staged / "input" / "dicom"
            if kind == "zip":
                await asyncio.to_thread(
                    extract_zip, blob, folder, c.max_zip_entries, int(c.max_unpacked_mb * 2**20)
                )
                blob.unlink()
            else:
                folder.mkdir(parents=True)
                blob.rename(folder / "00000")
            rel = "input/dicom"
        else:
            (staged / "input").mkdir()
            rel = f"input/study.{kind}"
            blob.rename(staged / rel)
            if kind.startswith("nii"):
                await asyncio.to_thread(check_nifti_size, staged / rel, int(c.max_unpacked_mb * 2**20))
        entry = await asyncio.to_thread(
            store.add, study_id, "dicom" if kind == "zip" else kind, staged, rel, None
        )
        return entry, True
    finally:
        shutil.rmtree(staged, ignore_errors=True)


async def _add_path(state: ServerState, request: Request) -> tuple[StudyEntry, bool]:
    root = state.config.allowed_root
    if root is None:
        raise ApiError(403, "paths_disabled", "this server takes uploads only (no --allowed-root configured)")
    raw = await receive_body_json(request)
    req = PathRequest.model_validate(raw)
    root = Path(root).resolve()
    target = (root / req.path).resolve()
    if not target.is_relative_to(root):
        raise ApiError(403, "path_outside_root", "the path is outside the server's allowed root")
    if not target.exists():
        raise ApiError(422, "bad_study", "no such file or folder under the allowed root")
    study_id = await asyncio.to_thread(hash_path, target)
    if study_id in state.store.entries:
        return state.store.entries[study_id], False
    staged = state.store.scratch()
    try:
        entry = await asyncio.to_thread(state.store.add, study_id, "path", staged, None, target)
        return entry, True
    finally:
        shutil.rmtree(staged, ignore_errors=True)


async def receive_body_json(request: Request, limit: int = 64 * 1024) -> Any:
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "request_too_large", f"JSON body over {limit} bytes")
    try:
        return json.loads(data)
    except ValueError:
        raise ApiError(400, "bad_request", "the body is not valid JSON") from None


# ------------------------------------------------------------------------------------------ asking


def _ask_job(
    state: ServerState, pipe: Any, entry: StudyEntry, body: AskRequest, kwargs: dict, result_dir: Path
):
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
        if job.first_text is not None and job.started is not None:
            metrics.ttft.observe(job.first_text - job.started)
        t = result.timings_dict()
        metrics.tokens.inc(len(result.tokens))
        if t["decode_tokens_per_s"]:
            metrics.decode_rate.observe(t["decode_tokens_per_s"])
        if result.mask is None and not body.preview:
            return result.to_dict()
        return _write_files(pipe, result, result_dir, body.preview)

    return run


def _write_files(pipe: Any, result: Any, out: Path, preview: bool) -> dict[str, Any]:
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


async def _wait(job: Job, request: Request, state: ServerState) -> dict[str, Any]:
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


def _event(name: str, payload: Any) -> bytes:
    return format_sse_event(data_str=json.dumps(payload), event=name)


async def _sse(job: Job, state: ServerState):
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
        try:
            result = job.future.result()
        except ApiError as exc:
            yield _event("error", exc.body())
        except Exception as exc:
            log.error("unexpected %s in a stream", type(exc).__name__)
            yield _event("error", ApiError(500, "internal_error", f"unexpected {type(exc).__name__}").body())
        else:
            yield _event("result", result)
    finally:
        if not job.future.done():
            job.cancel("disconnect")


# ------------------------------------------------------------------------------------------ access log


class _AccessLog:
    """ASGI middleware: one log line and the request metrics per request, by route template.

    Logs method, route template, status, milliseconds and the study id; never query strings, headers
    (keys), bodies or client file names.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            seconds = time.perf_counter() - t0
            self.metrics.requests.labels(scope["method"], template, str(status[0])).inc()
            self.metrics.latency.labels(scope["method"], template).observe(seconds)
            study = (scope.get("path_params") or {}).get("study_id")
            log.info(
                "%s %s %d %.1f ms%s",
                scope["method"],
                template,
                status[0],
                seconds * 1000,
                f" study={study}" if study else "",
            )
