"""``m3d-edge listen``: a DICOM node that answers every series it receives (pynetdicom SCP + SCU).

    node = DicomNode(load_config("node.toml"), Pipeline.open("bundle"))
    node.serve_forever()          # until SIGINT/SIGTERM or node.stop()

* C-ECHO and C-STORE SCP on ``[node] port`` as ``ae_title``; callers outside ``allowed_ae_titles`` /
  ``allowed_hosts`` are rejected at association time (logged with AE title and address only).
* Instances are written to ``STATE/incoming/SERIES/`` as they arrive (see :mod:`dicom_spool`); a sender that
  would exceed ``max_spool_mb`` or ``max_instances_per_association`` gets status 0xA700 (out of resources).
* A series quiet for ``quiet_seconds`` is claimed; unreadable instances go to ``STATE/corrupt/``; the
  configured tasks of the matching rules run one by one (a task with a ``result.json`` is done and skipped on
  resume); their SEG and SR go to the outbox (:mod:`dicom_outbox`) and then to the destination AE.
* Logs name series and SOP instance UIDs, AE titles and addresses; never a patient attribute.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from m3d_edge.errors import PromptError
from m3d_edge.serve.dicom_config import NodeConfig, TaskSpec
from m3d_edge.serve.dicom_outbox import Outbox
from m3d_edge.serve.dicom_spool import Spool, now_iso, read_json, valid_uid, write_json

LOG = logging.getLogger("m3d_edge.node")
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
KIND_FILES = {"seg": "result_seg.dcm", "sr": "result_sr.dcm"}


def answer_task(
    pipe: Any, series_dir: Path, spec: TaskSpec, out_dir: Path, cfg: NodeConfig
) -> dict[str, str]:
    """Run one configured task on one series folder and write its outputs (``result.json`` last).

    The single adapter between the node and the per-study runner: re-point it at ``m3d_edge.jobs`` when the
    batch engine's single-study entry point lands; nothing else in the node calls the pipeline.
    """
    from m3d_edge.runtime.generate import SamplingParams
    from m3d_edge.runtime.outputs import write_outputs
    from m3d_edge.runtime.prompts import TASKS

    bias = pipe.seg_bias(cfg.force_seg and TASKS[spec.task].wants_mask)
    result = pipe.ask(
        series_dir,
        task=spec.task,
        target=spec.argument,
        max_new_tokens=cfg.max_new_tokens,
        sampling=SamplingParams(logit_bias=bias),
    )
    formats = ("json", *[k for k in ("seg", "sr") if k in cfg.outputs])
    return write_outputs(
        result,
        out_dir,
        formats=formats,
        stem="result",
    )


def _short(exc: BaseException) -> str:
    """An error for the log and error.json: its type and first line (our messages name files, not patients)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class DicomNode:
    def __init__(self, cfg: NodeConfig, pipe: Any) -> None:
        self.cfg = cfg
        self.pipe = pipe
        self.spool = Spool(cfg.state_dir)
        self.outbox = Outbox(self.spool, cfg.retry_initial_seconds, cfg.retry_max_seconds)
        self._lock = threading.Lock()  # spool writes vs. claiming a series folder
        self._stop = threading.Event()
        self._spool_bytes = self.spool.spool_bytes()
        self._server = None
        self.port: int | None = None

    # -- SCP ---------------------------------------------------------------------------------
    def _caller_allowed(self, ae_title: str, host: str) -> bool:
        ok_ae = not self.cfg.allowed_ae_titles or ae_title in self.cfg.allowed_ae_titles
        ok_host = not self.cfg.allowed_hosts or host in self.cfg.allowed_hosts
        return ok_ae and ok_host

    def _on_requested(self, event) -> None:
        req = (
            event.assoc.requestor
        )  # its ae_title is filled in only after negotiation: read the A-ASSOCIATE-RQ
        ae_title, host = str(req.primitive.calling_ae_title or "").strip(), str(req.address)
        if not self._caller_allowed(ae_title, host):
            LOG.warning("refused association from AE %r at %s: not on the allow-list", ae_title, host)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE unknown
            event.assoc.kill()
            return
        if self._spool_bytes >= self.cfg.max_spool_mb * 1e6:
            LOG.warning("refused association from AE %r at %s: spool full", ae_title, host)
            event.assoc.acse.send_reject(0x02, 0x03, 0x01)  # transient, temporary congestion
            event.assoc.kill()

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> int:
        assoc = event.assoc
        count = getattr(assoc, "_m3d_instances", 0) + 1
        assoc._m3d_instances = count
        caller = f"AE {str(assoc.requestor.ae_title).strip()!r} at {assoc.requestor.address}"
        if count > self.cfg.max_instances_per_association:
            if count == self.cfg.max_instances_per_association + 1:
                LOG.warning("%s: over %d instances in one association; refusing the rest (0xA700)", caller,
                            self.cfg.max_instances_per_association)  # fmt: skip
            return OUT_OF_RESOURCES
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            LOG.warning("%s: cannot encode a received instance (%s)", caller, type(exc).__name__)
            return CANNOT_UNDERSTAND
        try:
            ds = event.dataset
            series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception as exc:
            with self._lock:
                path = self.spool.quarantine(
                    data, f"unparsed-{now_iso()}", f"header unreadable: {type(exc).__name__}"
                )
            LOG.warning("%s: corrupt instance (header unreadable: %s) kept as %s", caller, type(exc).__name__,
                        path.name)  # fmt: skip
            return CANNOT_UNDERSTAND
        if not (valid_uid(series_uid) and valid_uid(sop_uid)):
            LOG.warning("%s: instance with an invalid Series/SOP Instance UID refused", caller)
            return CANNOT_UNDERSTAND
        if self._spool_bytes + len(data) > self.cfg.max_spool_mb * 1e6:
            LOG.warning("%s: spool limit %.0f MB reached; instance %s refused (0xA700)", caller,
                        self.cfg.max_spool_mb, sop_uid)  # fmt: skip
            return OUT_OF_RESOURCES
        from m3d_edge.fileio import atomic_write_bytes

        try:
            with self._lock:
                atomic_write_bytes(self.spool.incoming_path(series_uid, sop_uid), data)
                self._spool_bytes += len(data)
        except OSError as exc:
            LOG.error("cannot spool instance %s of series %s: %s", sop_uid, series_uid, type(exc).__name__)
            return OUT_OF_RESOURCES
        LOG.debug("stored %s (series %s) from %s", sop_uid, series_uid, caller)
        return 0x0000

    def start_server(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = 8
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            self._server = ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise PromptError(
                f"cannot listen on {self.cfg.host}:{self.cfg.port}: {exc.strerror or exc}"
            ) from None
        self.port = int(self._server.server_address[1])
        LOG.info("listening as %s on %s:%d", self.cfg.ae_title, self.cfg.host, self.port)

    # -- worker ------------------------------------------------------------------------------
    def process_run(self, run: Path) -> str:
        """Finish one claimed run: check instances, match rules, run tasks, queue outputs; returns its state."""
        instances = run / "instances"
        if not instances.exists() and not (run / "state.json").exists():  # killed between mkdir and rename
            run.rmdir()
            return "gone"
        state = read_json(run / "state.json") or {"run": run.name, "claimed": now_iso()}
        if "series_instance_uid" not in state:
            meta = self._check_instances(run.name, instances)
            if meta is None:
                write_json(run / "error.json", {"error": "no readable instance", "time": now_iso()})
                self.spool.move(run, "failed")
                LOG.error("run %s failed: no readable instance", run.name)
                return "failed"
            state.update(meta)
            write_json(run / "state.json", state)
        tasks = self.cfg.tasks_for(state.get("modality"), state.get("body_part"))
        if not tasks:
            state.update(status="ignored", reason="no rule matches", finished=now_iso())
            write_json(run / "state.json", state)
            self._drop_instances(run, keep=False)
            self.spool.move(run, "ignored")
            LOG.info("series %s ignored: no rule for Modality=%s BodyPartExamined=%s",
                     state["series_instance_uid"], state.get("modality"), state.get("body_part"))  # fmt: skip
            return "ignored"
        try:
            for spec in tasks:
                out = run / "out" / spec.key
                if (out / "result.json").is_file():
                    continue
                t0 = time.perf_counter()
                answer_task(self.pipe, instances, spec, out, self.cfg)
                LOG.info("series %s: %s done in %.1f s", state["series_instance_uid"], spec.text,
                         time.perf_counter() - t0)  # fmt: skip
            queued = self._enqueue(run, state, tasks)
        except Exception as exc:  # one bad series must not stop the node
            error = _short(exc)
            write_json(run / "error.json", {"error": error, "time": now_iso()})
            self.spool.move(run, "failed")
            LOG.error("series %s failed: %s", state["series_instance_uid"], error)
            return "failed"
        state.update(status="done", finished=now_iso(), tasks=[t.text for t in tasks], queued=queued)
        write_json(run / "state.json", state)
        self._drop_instances(run, keep=self.cfg.keep_instances)
        self.spool.move(run, "done")
        LOG.info(
            "series %s done: %d object(s) queued for the destination", state["series_instance_uid"], queued
        )
        return "done"

    def _check_instances(self, name: str, instances: Path) -> dict[str, Any] | None:
        """Read every instance fully; move unreadable ones to corrupt/. Returns the series' rule attributes."""
        import pydicom

        meta = None
        for f in sorted(instances.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(f)
                if "PixelData" in ds:
                    ds.pixel_array  # noqa: B018  (decodes: truncated or undecodable pixels raise)
            except Exception as exc:
                reason = _short(exc)
                self.spool.quarantine(f, f.stem, f"run {name}: {reason}")
                LOG.warning("corrupt instance %s in run %s: %s (the rest of the series goes on)", f.stem, name,
                            reason)  # fmt: skip
                continue
            if meta is None:
                meta = {
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "study_instance_uid": str(getattr(ds, "StudyInstanceUID", "")),
                    "modality": str(getattr(ds, "Modality", "") or ""),
                    "body_part": str(getattr(ds, "BodyPartExamined", "") or ""),
                }
        if meta is not None:
            meta["instances"] = len(list(instances.glob("*.dcm")))
        return meta

    def _enqueue(self, run: Path, state: dict[str, Any], tasks: list[TaskSpec]) -> int:
        import pydicom

        n = 0
        for spec in tasks:
            for kind in ("seg", "sr"):
                path = run / "out" / spec.key / KIND_FILES[kind]
                if kind not in self.cfg.outputs or not path.is_file():
                    continue
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                info = {
                    "run": run.name,
                    "task": spec.text,
                    "kind": kind,
                    "series_instance_uid": state["series_instance_uid"],
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                }
                if self.outbox.enqueue(f"{run.name}__{spec.key}__{kind}", path, info):
                    n += 1
        return n

    @staticmethod
    def _drop_instances(run: Path, keep: bool) -> None:
        if keep:
            return
        import shutil

        shutil.rmtree(run / "instances", ignore_errors=True)

    def step(self) -> bool:
        """One round of the worker: resume or claim one series, then flush the outbox. True if it did work."""
        did = False
        pending = self.spool.runs("processing")
        if not pending:
            with self._lock:
                quiet = self.spool.quiet_runs(self.cfg.quiet_seconds)
                if quiet:
                    pending = [self.spool.claim(quiet[0])]
                    LOG.info("series %s quiet for %.0f s: claimed as run %s", quiet[0].name,
                             self.cfg.quiet_seconds, pending[0].name)  # fmt: skip
        if pending:
            self.process_run(pending[0])
            self._spool_bytes = self.spool.spool_bytes()
            did = True
        if self.outbox.due():
            sent, _ = self.outbox.flush(self.cfg.destination, self.cfg.ae_title)
            did = did or sent > 0
        return did

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def serve_forever(self, poll: float = 0.25, on_ready=None) -> None:
        """Start the SCP and run the worker until :meth:`stop` (or SIGINT/SIGTERM in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
        resumed = self.spool.runs("processing")
        if resumed:
            LOG.info("resuming %d run(s) left in processing", len(resumed))
        self.start_server()
        if on_ready is not None:
            on_ready(self)
        try:
            while not self._stop.is_set():
                if not self.step():
                    self._stop.wait(poll)
        except KeyboardInterrupt:
            pass
        finally:
            if self._server is not None:
                self._server.shutdown()
            LOG.info("stopped")


def node_status(spool: Spool) -> dict[str, Any]:
    """What ``listen-status`` shows: each state's runs, the outbox and the sent count."""
    out: dict[str, Any] = {}
    now = time.time()
    for state in ("incoming", "processing", "failed", "done", "ignored"):
        rows = []
        for run in spool.runs(state):
            row: dict[str, Any] = {"run": run.name}
            if state == "incoming":
                row["instances"] = len(list(run.glob("*.dcm")))
                row["quiet_seconds"] = round(now - run.stat().st_mtime, 1)
            else:
                st = read_json(run / "state.json") or {}
                row.update({k: st.get(k) for k in ("modality", "body_part", "instances", "finished")})
            if state == "failed":
                row["error"] = (read_json(run / "error.json") or {}).get("error")
            rows.append(row)
        out[state] = rows
    out["outbox"] = [
        {k: e.meta.get(k) for k in ("id", "kind", "sop_instance_uid", "attempts", "next_try", "last_error")}
        for e in Outbox(spool).entries()
    ]
    out["sent"] = len(list(spool.folder("sent").glob("*.json")))
    out["corrupt"] = len(list(spool.folder("corrupt").glob("*.dcm")))
    return out
