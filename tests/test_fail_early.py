"""Fail before the work: arguments are checked before a model is loaded; Ctrl-C in chat stops one answer."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cli import invoke


@pytest.fixture(scope="module")
def npy(tmp_path_factory):
    path = tmp_path_factory.mktemp("npy") / "case.npy"
    np.save(path, __import__("conftest").ct_like_volume(5))
    return path


def _no_bundle(tmp_path):
    """A bundle path that does not exist: a command that got past validation would fail with exit 4."""
    return tmp_path / "not-a-bundle"


def test_out_that_is_a_file_fails_before_loading(tmp_path, npy):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for args in (
        ("run", _no_bundle(tmp_path), npy, "--task", "report", "--out", a_file),
        ("run", _no_bundle(tmp_path), npy, "--task", "report", "--out", a_file / "sub"),
        ("chat", _no_bundle(tmp_path), npy, "--out", a_file),
        ("batch", _no_bundle(tmp_path), tmp_path, "--task", "report", "--out", a_file),
    ):
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "is not a folder" in r.stderr or "is a file, not a folder" in r.stderr
        assert "unexpected" not in r.stderr


def test_other_arguments_fail_before_loading(tmp_path, npy):
    bundle = _no_bundle(tmp_path)
    r = invoke("run", bundle, npy, "--task", "report", "--threads", "-1")
    assert r.exit_code == 2 and "--threads -1" in r.stderr
    r = invoke("run", bundle, npy, "--task", "report", "-n", "0")
    assert r.exit_code == 2 and "--max-new-tokens 0" in r.stderr
    r = invoke("run", bundle, tmp_path / "missing.nii.gz", "--task", "report")
    assert r.exit_code == 3 and "no such file or folder" in r.stderr
    (tmp_path / "notes.txt").write_text("x")
    r = invoke("chat", bundle, tmp_path / "notes.txt")
    assert r.exit_code == 3 and "not a DICOM folder or file" in r.stderr
    r = invoke("run", bundle, npy, "--task", "segment")
    assert r.exit_code == 2  # the task argument, also before the bundle


def test_ctrl_c_during_a_chat_answer_stops_only_that_answer(tiny_bundles, npy):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "m3d_edge.cli.app", "chat", str(tiny_bundles["phi3"]), str(npy), "-n", "600",
           "--force-seg"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    out = ""

    def read_until(marker: str, timeout: float) -> None:
        nonlocal out
        end = time.monotonic() + timeout
        while marker not in out and time.monotonic() < end:
            if sel.select(timeout=0.5):
                chunk = os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
                if not chunk:
                    break
                out += chunk

    try:
        read_until("study ready", 120)
        proc.stdin.write("a long answer please\n")
        proc.stdin.flush()
        read_until("[SEG]", 60)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/task report\n/quit\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out += rest
    assert proc.returncode == 0, (out[-500:], err)
    assert "answer stopped (Ctrl-C)" in err
    assert out.count("prefill") == 1  # the interrupted answer printed no summary; the next one did
