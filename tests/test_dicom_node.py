"""The DICOM node on 127.0.0.1: pynetdicom SCU -> `m3d-edge listen` (a real subprocess) -> pynetdicom SCP.

No network mocks: every test sends real associations over loopback. Quiet times and backoff are short.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest

pynetdicom = pytest.importorskip("pynetdicom")

from pynetdicom import AE, AllStoragePresentationContexts, evt  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # noqa: E402

from m3d_edge.runtime.imaging.phantom import write_phantom_series  # noqa: E402
from m3d_edge.runtime.imaging.sr import read_dicom_sr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
N_NEW = 6  # max_new_tokens of the node and of the `run` it is compared with
TASKS = ["report", "segment liver"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Destination:
    """A pynetdicom storage SCP standing in for the PACS: keeps every object it receives, in order."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port, self.folder, self.received = port, folder, []
        self.server = None
        folder.mkdir(parents=True, exist_ok=True)

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{len(self.received):03d}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.received.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID), path))
        return 0x0000

    def start(self) -> Destination:
        ae = AE(ae_title="DEST")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def of(self, sop_class: str) -> list[Path]:
        return [p for c, _, p in self.received if c == sop_class]


def write_config(folder: Path, port: int, dest_port: int, **node) -> Path:
    allowed = node.pop("allowed_ae_titles", ["SENDER"])
    lines = [
        "[node]",
        'ae_title = "M3D_EDGE"',
        'host = "127.0.0.1"',
        f"port = {port}",
        'state_dir = "state"',
        f"quiet_seconds = {node.pop('quiet_seconds', 1.0)}",
        f"allowed_ae_titles = {json.dumps(allowed)}",
        'allowed_hosts = ["127.0.0.1"]',
        *(f"{k} = {json.dumps(v)}" for k, v in node.items()),
        "[destination]",
        'ae_title = "DEST"',
        'host = "127.0.0.1"',
        f"port = {dest_port}",
        "retry_initial_seconds = 0.3",
        "retry_max_seconds = 1.0",
        "[model]",
        f"max_new_tokens = {N_NEW}",
        "force_seg = true",
        "threads = 1",
        "[[rules]]",
        'modality = ["CT"]',
        'body_part = ["ABDOMEN"]',
        f"tasks = {json.dumps(TASKS)}",
    ]
    path = folder / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Listener:
    """`m3d-edge listen` in its own process (so a test can kill it with SIGKILL)."""

    def __init__(self, bundle: Path, config: Path, port: int) -> None:
        self.bundle, self.config, self.port = bundle, config, port
        self.log = config.parent / "listener.stderr"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Listener:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [
            sys.executable,
            "-m",
            "m3d_edge.cli.app",
            "listen",
            str(self.bundle),
            "--config",
            str(self.config),
        ]
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: self.proc.poll() is not None or echo(self.port), 60, "the listener to answer C-ECHO")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def echo(port: int, ae_title: str = "SENDER") -> bool:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="M3D_EDGE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def send(port: int, datasets, ae_title: str = "SENDER") -> list[int]:
    """C-STORE every dataset over one association; returns the statuses (-1: association refused)."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="M3D_EDGE")
    if not assoc.is_established:
        return [-1]
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def series(folder: Path, seed: int = 0, slices: int = 12) -> list[pydicom.Dataset]:
    write_phantom_series(folder, slices=slices, rows=48, cols=48, seed=seed)
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def state(config: Path) -> Path:
    return config.parent / "state"


def done_runs(config: Path) -> list[str]:
    d = state(config) / "done"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["phi3"]


@pytest.fixture(scope="module")
def run_answers(bundle, tmp_path_factory):
    """What `m3d-edge run` answers on the phantom for each node task (the same study, greedy, N_NEW tokens)."""
    folder = tmp_path_factory.mktemp("runph")
    series(folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    answers = {}
    for task in TASKS:
        name, *arg = task.split(None, 1)
        cmd = [sys.executable, "-m", "m3d_edge.cli.app", "run", str(bundle), str(folder), "--task", name]
        cmd += ["--target", arg[0], "--force-seg"] if arg else []
        out = subprocess.run(
            [*cmd, "-n", str(N_NEW), "--json"], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        answers[task] = json.loads(out.stdout)["text"]
    return answers


@pytest.fixture(scope="module")
def node(bundle, tmp_path_factory):
    """One listener and its destination for the happy path and the refusal tests."""
    root = tmp_path_factory.mktemp("node")
    port, dest_port = free_port(), free_port()
    dest = Destination(dest_port, root / "dest").start()
    config = write_config(root, port, dest_port)
    listener = Listener(bundle, config, port).start()
    yield listener, dest, config
    listener.stop()
    dest.stop()


def sr_texts(dest: Destination) -> dict[str, str]:
    out = {}
    for path in dest.of(SR_CLASS):
        c = read_dicom_sr(path)
        out[c.question] = c.text
    return out


def test_happy_path_seg_and_sr_come_back(node, tmp_path, run_answers):
    listener, dest, config = node
    datasets = series(tmp_path / "ph")
    assert send(listener.port, datasets) == [0] * len(datasets)
    uid = datasets[0].SeriesInstanceUID
    wait_for(lambda: len(dest.received) >= 3, 90, "a SEG and two SRs at the destination")
    time.sleep(0.5)
    assert done_runs(config) == [uid]
    assert sorted(c for c, _, _ in dest.received) == sorted([SEG_CLASS, SR_CLASS, SR_CLASS])
    assert len({s for _, s, _ in dest.received}) == 3  # three distinct objects, each once
    from test_sr import dciodvfy_errors

    seg_path = dest.of(SEG_CLASS)[0]
    seg = pydicom.dcmread(seg_path)
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs <= {ds.SOPInstanceUID for ds in datasets} and refs
    assert dciodvfy_errors(seg_path) == []
    questions = {}
    for path in dest.of(SR_CLASS):
        assert dciodvfy_errors(path) == []
        c = read_dicom_sr(path)
        assert c.study_instance_uid == datasets[0].StudyInstanceUID
        assert c.source_series_instance_uid == uid
        questions[c.question] = c
    segment = next(c for q, c in questions.items() if "segment" in q)
    report = next(c for q, c in questions.items() if "segment" not in q)
    assert report.text == run_answers["report"]
    assert segment.text == run_answers["segment liver"]
    assert segment.seg_sop_instance_uid == seg.SOPInstanceUID
    log = listener.text()
    assert uid in log and "PHANTOM" not in log  # UIDs, never names
    assert not (state(config) / "done" / uid / "instances").exists()  # instances dropped after success


def test_refused_caller_and_echo(node):
    listener, _dest, _config = node
    assert echo(listener.port)
    assert send(listener.port, [], ae_title="INTRUDER") == [-1]
    assert not echo(listener.port, ae_title="INTRUDER")
    wait_for(lambda: "refused association from AE 'INTRUDER'" in listener.text(), 5, "the refusal in the log")


def test_non_ct_series_is_ignored(node, tmp_path):
    listener, dest, config = node
    datasets = series(tmp_path / "mr", seed=3, slices=6)
    for ds in datasets:
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    before = len(dest.received)
    assert send(listener.port, datasets) == [0] * len(datasets)
    uid = datasets[0].SeriesInstanceUID
    ignored = state(config) / "ignored" / uid
    wait_for(ignored.is_dir, 30, "the MR series to be ignored")
    assert json.loads((ignored / "state.json").read_text())["reason"] == "no rule matches"
    assert len(dest.received) == before and uid not in done_runs(config)
    assert f"series {uid} ignored: no rule for Modality=MR" in listener.text()


def test_corrupt_instance_is_logged_and_the_rest_processed(node, tmp_path):
    listener, dest, config = node
    datasets = series(tmp_path / "bad", seed=5)
    bad = datasets[-1]  # the last slice: the rest is still a gap-free series
    bad.PixelData = bad.PixelData[:100]  # truncated pixels: decodes as a header, fails as an image
    before = len(dest.received)
    assert send(listener.port, datasets) == [0] * len(datasets)
    uid = datasets[0].SeriesInstanceUID
    wait_for(
        lambda: uid in done_runs(config) and len(dest.received) >= before + 3, 90, "the series to finish"
    )
    st = json.loads((state(config) / "done" / uid / "state.json").read_text())
    assert st["instances"] == len(datasets) - 1
    assert f"corrupt instance {bad.SOPInstanceUID}" in listener.text()
    assert list((state(config) / "corrupt").glob(f"*{bad.SOPInstanceUID}*.dcm"))
    new = dest.received[before:]
    seg = pydicom.dcmread(next(p for c, _, p in new if c == SEG_CLASS))
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert bad.SOPInstanceUID not in refs


def test_destination_down_then_up_gets_each_object_once(bundle, tmp_path):
    port, dest_port = free_port(), free_port()
    config = write_config(tmp_path, port, dest_port)
    listener = Listener(bundle, config, port).start()
    dest = Destination(dest_port, tmp_path / "dest")
    try:
        datasets = series(tmp_path / "ph", seed=1)
        assert send(port, datasets) == [0] * len(datasets)
        outbox = state(config) / "outbox"

        def failed_attempts():
            metas = [json.loads(p.read_text()) for p in outbox.glob("*.json")]
            return len(metas) == 3 and all(m["attempts"] >= 2 for m in metas)

        wait_for(failed_attempts, 90, "three queued objects with failed attempts")
        dest.start()
        wait_for(lambda: len(dest.received) >= 3, 30, "the queued objects to arrive")
        time.sleep(2.5)  # more than the longest backoff: nothing is sent again
        counts = Counter(s for _, s, _ in dest.received)
        assert len(counts) == 3 and set(counts.values()) == {1}
        assert not list(outbox.glob("*")) and len(list((state(config) / "sent").glob("*.json"))) == 3
    finally:
        listener.stop()
        dest.stop()


def test_killed_listener_resumes_without_duplicates(bundle, tmp_path):
    port, dest_port = free_port(), free_port()
    config = write_config(tmp_path, port, dest_port, keep_instances=True)
    dest = Destination(dest_port, tmp_path / "dest").start()
    listener = Listener(bundle, config, port).start()
    try:
        datasets = series(tmp_path / "ph", seed=2)
        uid = datasets[0].SeriesInstanceUID
        assert send(port, datasets) == [0] * len(datasets)
        first = state(config) / "processing" / uid / "out" / "report" / "result.json"
        wait_for(first.is_file, 60, "the first task of the series", every=0.01)
        listener.kill()  # mid-series: the second task has not finished
        assert (state(config) / "processing" / uid).is_dir()
        report_sr = pydicom.dcmread(first.parent / "result_sr.dcm").SOPInstanceUID
        listener = Listener(bundle, config, port).start()
        wait_for(lambda: uid in done_runs(config) and len(dest.received) >= 3, 90, "the resumed series")
        time.sleep(1.0)
        counts = Counter(s for _, s, _ in dest.received)
        assert len(counts) == 3 and set(counts.values()) == {1}
        assert report_sr in counts  # the report written before the kill is the one sent, not a new copy
        assert "resuming 1 run(s) left in processing" in listener.text()
        assert len(list((state(config) / "done" / uid / "instances").glob("*.dcm"))) == len(datasets)
    finally:
        listener.stop()
        dest.stop()


def test_status_and_retry_commands(tmp_path):
    from typer.testing import CliRunner

    from m3d_edge.cli.app import app
    from m3d_edge.serve.dicom_spool import Spool, write_json

    config = write_config(tmp_path, free_port(), free_port())
    spool = Spool(state(config))
    run = spool.folder("failed") / "1.2.3"
    run.mkdir()
    write_json(run / "state.json", {"series_instance_uid": "1.2.3", "modality": "CT", "instances": 4})
    write_json(run / "error.json", {"error": "StudyError: series has a gap"})
    r = CliRunner().invoke(app, ["listen-status", "--config", str(config), "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["failed"] == [
        {"run": "1.2.3", "modality": "CT", "body_part": None, "instances": 4, "finished": None,
         "error": "StudyError: series has a gap"}
    ]  # fmt: skip
    r = CliRunner().invoke(app, ["listen-status", "--config", str(config)])
    assert r.exit_code == 0 and "1.2.3" in r.stdout and "failed" in r.stdout
    r = CliRunner().invoke(app, ["listen-retry", "--config", str(config)])
    assert r.exit_code == 0 and "1 failed series back to processing" in r.stdout
    assert (spool.folder("processing") / "1.2.3" / "state.json").is_file() and not run.exists()
    (tmp_path / "bad.toml").write_text('[node]\nstate_dir = "s"\nport = 70000\n')
    r = CliRunner().invoke(app, ["listen-status", "--config", str(tmp_path / "bad.toml")])
    assert r.exit_code == 2 and "port 70000" in r.stderr
    shutil.rmtree(state(config))


def test_limits_refuse_without_crashing(bundle, tmp_path):
    datasets = series(tmp_path / "mr", seed=7, slices=10)
    for ds in datasets:  # MR: no rule matches, so nothing but the limits is exercised
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    size = len((tmp_path / "mr" / "CT0001.dcm").read_bytes())
    port = free_port()
    limits = {"max_instances_per_association": 3, "max_spool_mb": 4.5 * size / 1e6, "quiet_seconds": 60}
    config = write_config(tmp_path, port, free_port(), **limits)
    listener = Listener(bundle, config, port).start()
    try:
        assert send(port, datasets[:5]) == [0, 0, 0, 0xA700, 0xA700]  # per association
        assert send(port, datasets[5:8]) == [0, 0xA700, 0xA700]  # the spool holds 4 of 4.5
        assert echo(port)  # still serving
        incoming = state(config) / "incoming" / datasets[0].SeriesInstanceUID
        assert sorted(p.stem for p in incoming.glob("*.dcm")) == sorted(
            ds.SOPInstanceUID for ds in datasets[:3] + datasets[5:6]
        )
        text = listener.text()
        assert "over 3 instances in one association" in text and "spool limit" in text
    finally:
        listener.stop()


def test_busy_port_and_bad_config_are_one_line_errors(tmp_path):
    from m3d_edge.errors import PromptError
    from m3d_edge.serve.dicom_config import load_config
    from m3d_edge.serve.dicom_node import DicomNode

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = load_config(write_config(tmp_path, busy.getsockname()[1], free_port()))
        with pytest.raises(PromptError, match=r"cannot listen on 127\.0\.0\.1:"):
            DicomNode(cfg, pipe=None).start_server()
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nstate_dir = "s"\n[[rules]]\ntasks = ["segment"]\n')
    with pytest.raises(PromptError, match=r"bad\.toml \[\[rules\]\] #1: task 'segment' needs an argument"):
        load_config(bad)
    bad.write_text('[node]\nstate_dir = "s"\nqiuet_seconds = 3\n')
    with pytest.raises(PromptError, match=r"unknown key\(s\) qiuet_seconds"):
        load_config(bad)
