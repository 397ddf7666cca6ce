"""``m3d-edge batch``: per-study results, errors.jsonl, exit codes, and resuming after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import ct_like_volume
from typer.testing import CliRunner

from m3d_edge.cli.app import app
from m3d_edge.jobs import discover, remove_stale_partials

runner = CliRunner()


def make_root(root: Path, n: int, broken: bool) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        np.save(root / f"case{i}.npy", ct_like_volume(i))
        names.append(f"case{i}")
    if broken:
        (root / "broken.npy").write_bytes(b"not a numpy file")
    return names


def test_discover_names(tmp_path):
    (tmp_path / "dicom_a").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b.nii.gz", "c.npy", "c.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [n for n, _ in discover(tmp_path)] == ["b", "c.nii", "c.npy", "dicom_a"]


def test_batch_writes_results_and_logs_errors(tiny_bundles, tmp_path):
    root, out = tmp_path / "studies", tmp_path / "out"
    names = make_root(root, 2, broken=True)
    args = [str(tiny_bundles["phi3"]), str(root), "--task", "report", "-n", "3", "--out", str(out)]
    r = runner.invoke(app, ["batch", *args])
    assert r.exit_code == 10, r.output  # some failed
    for name in names:
        d = json.loads((out / name / "result.json").read_text())
        assert d["task"] == "report" and d["study"]["kind"] == "npy"
    assert not (out / "broken").exists()
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["study"] == "broken" and errors[0]["type"] == "StudyError"
    summary = json.loads((out / "batch.json").read_text())
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (2, 1, 0)
    assert "failed" in r.stdout and "errors.jsonl" in r.stderr

    (root / "broken.npy").unlink()  # fixed: the rerun skips the done ones and exits 0
    r = runner.invoke(app, ["batch", *args])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "batch.json").read_text())
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (0, 0, 2)


def test_batch_argument_errors(tiny_bundles, tmp_path):
    b = str(tiny_bundles["phi3"])
    r = runner.invoke(app, ["batch", b, str(tmp_path / "none"), "--task", "report", "--out", str(tmp_path)])
    assert r.exit_code == 3
    (tmp_path / "empty").mkdir()
    r = runner.invoke(
        app, ["batch", b, str(tmp_path / "empty"), "--task", "report", "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 3 and "no studies" in r.stderr
    r = runner.invoke(app, ["batch", b, str(tmp_path), "--task", "nope", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["batch", b, str(tmp_path), "--task", "report", "--format", "png", "--out", "o"])
    assert r.exit_code == 2


def test_stale_partials_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "s").mkdir()
    stale = tmp_path / "s" / f".result.json.partial-{dead.pid}"
    live = tmp_path / "s" / f".result.json.partial-{os.getppid()}"  # a live process
    stale.write_text("{")
    live.write_text("{")
    assert remove_stale_partials(tmp_path) == 1
    assert not stale.exists() and live.exists()


def test_batch_resumes_after_sigkill(tiny_bundles, tmp_path):
    root, out = tmp_path / "studies", tmp_path / "out"
    names = make_root(root, 3, broken=False)
    cmd = [
        sys.executable, "-m", "m3d_edge.cli.app", "batch", str(tiny_bundles["phi3"]), str(root),
        "--task", "segment", "--target", "liver", "--force-seg", "-n", "2", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, COLUMNS="120")
    log = tmp_path / "first_run.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 240  # generous: the test machine may be busy
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if any(out.glob("*/result.json")):
                    break
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert any(out.glob("*/result.json")), f"the batch wrote nothing: {log.read_text()[-2000:]}"
    done_before = {p.parent.name for p in out.glob("*/result.json")}
    assert done_before and len(done_before) <= len(names)

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    for name in names:
        results = list((out / name).glob("*.json"))
        assert [p.name for p in results] == ["result.json"]
        d = json.loads(results[0].read_text())
        assert d["task"] == "segment" and d["mask"]["files"]["nifti"] == "result_mask.nii.gz"
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    summary = json.loads((out / "batch.json").read_text())
    assert summary["skipped"] == len(done_before), (summary, done_before)
    assert summary["ok"] + summary["skipped"] == len(names), summary
