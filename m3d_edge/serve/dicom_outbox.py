"""The outbox: SEG and SR objects waiting for the destination AE, sent by C-STORE SCU with backoff.

An entry is ``outbox/ID.dcm`` plus ``outbox/ID.json`` (written last, so a present JSON means a whole entry).
``ID`` is derived from the run, the task and the kind, so enqueueing the same output twice is a no-op.
After the destination confirms a C-STORE, ``sent/ID.json`` is written before the entry is removed; an
entry with a ``sent`` marker is never sent again. Failures are retried forever with exponential backoff
(``retry_initial_seconds`` doubling up to ``retry_max_seconds``); nothing is dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3d_edge.fileio import atomic_path
from m3d_edge.serve.dicom_spool import Spool, now_iso, read_json, write_json

LOG = logging.getLogger("m3d_edge.node")
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB007, 0xB006}  # success and the storage warnings


@dataclass
class OutboxEntry:
    id: str
    dcm: Path
    meta: dict[str, Any]


class Outbox:
    def __init__(self, spool: Spool, initial: float = 10.0, maximum: float = 600.0) -> None:
        self.spool = spool
        self.dir = spool.folder("outbox")
        self.sent_dir = spool.folder("sent")
        self.initial, self.maximum = float(initial), float(maximum)

    def enqueue(self, entry_id: str, source: Path, info: dict[str, Any]) -> bool:
        """Queue a copy of ``source``; False when this ID was already queued or sent."""
        meta_path = self.dir / f"{entry_id}.json"
        if meta_path.exists() or (self.sent_dir / f"{entry_id}.json").exists():
            return False
        with atomic_path(self.dir / f"{entry_id}.dcm") as tmp:
            tmp.write_bytes(Path(source).read_bytes())
        meta = {
            **info,
            "id": entry_id,
            "attempts": 0,
            "next_try": 0.0,
            "queued": now_iso(),
            "last_error": None,
        }
        write_json(meta_path, meta)
        return True

    def entries(self) -> list[OutboxEntry]:
        out = []
        for meta_path in sorted(self.dir.glob("*.json")):
            meta = read_json(meta_path)
            entry_id = meta_path.stem
            if meta is None:
                continue
            if (self.sent_dir / f"{entry_id}.json").exists():  # killed after the send, before the cleanup
                self._remove(entry_id)
                continue
            out.append(OutboxEntry(entry_id, self.dir / f"{entry_id}.dcm", meta))
        return out

    def due(self, now: float | None = None) -> list[OutboxEntry]:
        now = time.time() if now is None else now
        return [e for e in self.entries() if float(e.meta.get("next_try", 0)) <= now]

    def retry_now(self) -> int:
        """Make every waiting entry due at once (operator retry); returns how many."""
        n = 0
        for e in self.entries():
            e.meta["next_try"] = 0.0
            write_json(self.dir / f"{e.id}.json", e.meta)
            n += 1
        return n

    def _remove(self, entry_id: str) -> None:
        (self.dir / f"{entry_id}.json").unlink(missing_ok=True)
        (self.dir / f"{entry_id}.dcm").unlink(missing_ok=True)

    def _failed(self, entry: OutboxEntry, error: str) -> None:
        attempts = int(entry.meta.get("attempts", 0)) + 1
        wait = min(self.initial * 2 ** (attempts - 1), self.maximum)
        entry.meta.update(attempts=attempts, next_try=time.time() + wait, last_error=error)
        write_json(self.dir / f"{entry.id}.json", entry.meta)

    def _sent(self, entry: OutboxEntry, status: int) -> None:
        write_json(
            self.sent_dir / f"{entry.id}.json",
            {**entry.meta, "sent": now_iso(), "status": f"0x{status:04X}", "last_error": None},
        )
        self._remove(entry.id)

    def flush(self, destination, calling_ae: str) -> tuple[int, int]:
        """Send every due entry over one association; returns (sent, failed)."""
        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        due = self.due()
        if not due:
            return 0, 0
        if destination is None:
            for e in due:
                self._failed(e, "no [destination] configured")
            return 0, len(due)
        datasets = []
        for e in due:
            try:
                datasets.append((e, pydicom.dcmread(e.dcm)))
            except Exception as exc:  # an unreadable entry stays queued and visible in listen-status
                self._failed(e, f"cannot read queued object: {type(exc).__name__}")
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        # the objects' own transfer syntax, plus both uncompressed ones pynetdicom converts to if needed
        syntaxes = sorted({str(ds.file_meta.TransferSyntaxUID) for _, ds in datasets})
        syntaxes += [ts for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if ts not in syntaxes]
        for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
            ae.add_requested_context(sop_class, syntaxes)
        sent = failed = 0
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            for e, _ in datasets:
                self._failed(e, f"association with {where} failed")
            LOG.warning(
                "outbox: %s not reachable; %d object(s) wait (retry with backoff)", where, len(datasets)
            )
            return 0, len(datasets)
        try:
            for e, ds in datasets:
                try:
                    rsp = assoc.send_c_store(ds)
                    status = int(getattr(rsp, "Status", -1)) if rsp else -1
                except Exception as exc:
                    status, rsp = -1, None
                    LOG.warning(
                        "outbox: sending %s failed: %s", e.meta.get("sop_instance_uid"), type(exc).__name__
                    )
                if status in SUCCESS_STATUSES:
                    self._sent(e, status)
                    sent += 1
                    LOG.info("sent %s %s to %s", e.meta.get("kind"), e.meta.get("sop_instance_uid"), where)
                else:
                    failed += 1
                    self._failed(e, f"C-STORE to {where}: status {status if status < 0 else hex(status)}")
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        for e, _ in datasets[sent + failed :]:
            self._failed(e, f"association with {where} ended early")
            failed += 1
        return sent, failed
