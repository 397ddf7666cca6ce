"""The batch engine (m3d_edge.jobs): result keys and resume, collisions, the lock, the error log, privacy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_like_volume
from typer.testing import CliRunner

from m3d_edge.cli.app import app
from m3d_edge.errors import OutputError
from m3d_edge.jobs.error_log import log_error

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def studies(root: Path, n: int = 2, names: tuple[str, ...] = ()) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = names or tuple(f"case{i}" for i in range(n))
    for i, name in enumerate(names):
        np.save(root / f"{name}.npy", ct_like_volume(i))
    return list(names)


def batch(bundle, root, out, *extra: str):
    args = ["batch", str(bundle), str(root), "--out", str(out), "-n", "2", *extra]
    return runner.invoke(app, args)


def summary(out: Path) -> dict:
    return json.loads((out / "batch.json").read_text())


def test_resume_recomputes_when_the_request_changes(tiny_bundles, tmp_path):
    root, out, b = tmp_path / "s", tmp_path / "o", tiny_bundles["phi3"]
    names = studies(root)
    assert batch(b, root, out, "--task", "report").exit_code == 0
    r = batch(b, root, out, "--task", "report")
    assert (summary(out)["skipped"], summary(out)["ok"]) == (2, 0), r.output
    r = batch(b, root, out, "--task", "vqa", "-q", "Which organ?")
    assert r.exit_code == 0, r.output
    s = summary(out)
    assert (s["skipped"], s["ok"], s["recomputed"]) == (0, 2, 2)
    assert "replacing the summary of an earlier run" in r.stderr and "task" in r.stderr
    for name in names:
        d = json.loads((out / name / "result.json").read_text())
        assert d["task"] == "vqa" and d["provenance"]["job"]["key"]["question"] == "Which organ?"
    r = batch(b, root, out, "--task", "vqa", "-q", "Which organ?", "-n", "3")  # max_new_tokens differs
    assert summary(out)["recomputed"] == 2 and "max_new_tokens" in r.stderr


def test_empty_corrupt_or_incomplete_results_are_not_done(tiny_bundles, tmp_path):
    root, out, b = tmp_path / "s", tmp_path / "o", tiny_bundles["phi3"]
    studies(root, 3)
    args = ("--task", "segment", "--target", "liver", "--force-seg", "--format", "json,nifti")
    assert batch(b, root, out, *args).exit_code == 0
    (out / "case0" / "result.json").write_text("")
    (out / "case1" / "result.json").write_text("{not json")
    (out / "case2" / "result_mask.nii.gz").unlink()
    r = batch(b, root, out, *args)
    assert r.exit_code == 0 and summary(out)["ok"] == 3 and summary(out)["skipped"] == 0, r.output
    assert "result.json is empty or corrupt" in r.stderr and "result_mask.nii.gz) is missing" in r.stderr
    assert (out / "case2" / "result_mask.nii.gz").is_file()
    assert json.loads((out / "case0" / "result.json").read_text())["task"] == "segment"


def test_study_rewritten_in_place_is_recomputed(tiny_bundles, tmp_path):
    root, out, b = tmp_path / "s", tmp_path / "o", tiny_bundles["phi3"]
    studies(root, 2)
    assert batch(b, root, out, "--task", "report").exit_code == 0
    np.save(root / "case1.npy", ct_like_volume(7))
    r = batch(b, root, out, "--task", "report")
    assert (summary(out)["skipped"], summary(out)["ok"]) == (1, 1) and "study changed" in r.stderr


@pytest.mark.parametrize("reserved", ["errors.jsonl", "batch.json", "index.html"])
def test_study_named_like_our_files(tiny_bundles, tmp_path, reserved):
    root, out, b = tmp_path / "s", tmp_path / "o", tiny_bundles["phi3"]
    (root / reserved).mkdir(parents=True)
    np.save(root / reserved / "x.npy", ct_like_volume(0))  # a folder study (not DICOM: it fails)
    np.save(root / "ok.npy", ct_like_volume(1))
    for _ in range(2):
        r = batch(b, root, out, "--task", "report", "--preview")
        assert r.exit_code == 10, r.output  # the folder holds no DICOM: one failure, no crash
        assert (out / "ok" / "result.json").is_file() and (out / "index.html").is_file()
        json.loads((out / "batch.json").read_text())
        errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
        assert [e["study"] for e in errors] == [reserved]


def test_out_inside_the_root_is_not_a_study(tiny_bundles, tmp_path):
    root, b = tmp_path / "s", tiny_bundles["phi3"]
    studies(root, 1)
    out = root / "results"
    assert batch(b, root, out, "--task", "report").exit_code == 0
    r = batch(b, root, out, "--task", "report")
    assert r.exit_code == 0 and summary(out)["studies"] == 1, r.output
    assert not (out / "results").exists()


def test_out_that_is_a_file_is_a_usage_error(tiny_bundles, tmp_path):
    root, b = tmp_path / "s", tiny_bundles["phi3"]
    studies(root, 1)
    f = tmp_path / "file"
    f.write_text("x")
    r = batch(b, root, f, "--task", "report")
    assert r.exit_code == 2 and "is a file" in r.stderr
    r = runner.invoke(app, ["run", str(b), str(root / "case0.npy"), "--task", "report", "--out", str(f)])
    assert r.exit_code == 2 and "is a file" in r.stderr
    r = runner.invoke(
        app, ["run", "/nonexistent-bundle", str(root / "case0.npy"), "--task", "report", "-o", str(f)]
    )
    assert r.exit_code == 2  # checked before the bundle is opened


def test_second_batch_on_the_same_out_is_refused(tiny_bundles, tmp_path):
    root, out, b = tmp_path / "s", tmp_path / "o", tiny_bundles["phi3"]
    studies(root, 1)
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from m3d_edge.jobs.lock import OutputLock\n"
         "with OutputLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        r = batch(b, root, out, "--task", "report")
        assert r.exit_code == 11, r.output
        assert f"another batch is writing here (pid {holder.pid} on " in r.stderr
        assert not (out / "case0").exists()
    finally:
        holder.kill()
        holder.wait()
    assert batch(b, root, out, "--task", "report").exit_code == 0  # the lock died with its holder


def test_errors_log_holds_only_the_current_failures(tiny_bundles, tmp_path):
    root, out, b = tmp_path / "s", tmp_path / "o", tiny_bundles["phi3"]
    studies(root, 1)
    (root / "broken.npy").write_bytes(b"not a numpy file")
    for _ in range(2):
        assert batch(b, root, out, "--task", "report").exit_code == 10
        lines = (out / "errors.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["study"] == "broken"
    np.save(root / "broken.npy", ct_like_volume(3))
    assert batch(b, root, out, "--task", "report").exit_code == 0
    assert not (out / "errors.jsonl").exists() or (out / "errors.jsonl").read_text() == ""


def test_library_text_stays_out_of_the_error_log(tmp_path):
    log_error(tmp_path, "s", ValueError("/home/DOE_JOHN_123/secret.dcm: bad value 0x7fe0"))
    entry = json.loads((tmp_path / "errors.jsonl").read_text())
    assert entry["type"] == "ValueError" and "DOE" not in entry["error"] and "0x7fe0" not in entry["error"]


def test_disk_full_while_logging_is_an_output_error(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    (tmp_path / "errors.jsonl").symlink_to("/dev/full")
    with pytest.raises(OutputError, match=r"errors.jsonl: cannot write output \(No space left on device\)"):
        log_error(tmp_path, "s", ValueError("x"))


def test_disk_full_batch_exits_12_with_one_line(tiny_bundles, tmp_path):
    """A real full file system (a 256 KiB tmpfs in a private mount namespace)."""
    root, out = tmp_path / "s", tmp_path / "o"
    studies(root, 2)
    (root / "broken.npy").write_bytes(b"not a numpy file")
    out.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -rm (user and mount namespaces) is not available here")
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {out} && head -c 250000 /dev/zero > {out}/filler; "
        f"{sys.executable} -m m3d_edge.cli.app batch {tiny_bundles['phi3']} {root} --out {out} "
        "--task report -n 2"
    )
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200"), timeout=300,
    )  # fmt: skip
    assert r.returncode == 12, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write output (No space left on device)" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_run_out_replaces_the_previous_mask_and_seg(tiny_bundles, tmp_path):
    b = tiny_bundles["phi3"]
    from m3d_edge.runtime.imaging.phantom import write_phantom_series

    study = write_phantom_series(tmp_path / "ct")
    out = tmp_path / "o"
    r = runner.invoke(
        app,
        [
            "run",
            str(b),
            str(study),
            "--task",
            "segment",
            "--target",
            "liver",
            "--force-seg",
            "-n",
            "2",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0 and (out / "result_mask.nii.gz").is_file() and (out / "result_seg.dcm").is_file()
    r = runner.invoke(app, ["run", str(b), str(study), "--task", "report", "-n", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]
    assert json.loads((out / "result.json").read_text())["task"] == "report"


def test_atomic_writes_fsync_file_and_folder(tmp_path, monkeypatch):
    from m3d_edge.fileio import atomic_write_text

    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert str(tmp_path / ".a.json.partial-") in synced[0] and synced[1] == str(tmp_path)
    assert (tmp_path / "a.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------ privacy


def test_private_batch_keeps_source_names_out(tiny_bundles, tmp_path):
    root, out, b = tmp_path / "s", tmp_path / "o", tiny_bundles["phi3"]
    studies(root, names=("DOE_JOHN_123456",))
    (root / "SMITH_JANE_987").mkdir()  # a folder study with no DICOM: it fails, its message names it
    (root / "SMITH_JANE_987" / "note.txt").write_text("x")
    r = batch(b, root, out, "--task", "report", "--preview", "--private")
    assert r.exit_code == 10, r.output
    for secret in ("DOE", "SMITH", str(root)):
        for f in out.rglob("*"):
            assert secret not in f.name
            if f.is_file() and f.suffix in (".json", ".jsonl", ".html"):
                assert secret not in f.read_text(errors="replace"), (secret, f)
        assert secret not in r.output
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == 1 and folders[0].startswith("study-") and len(folders[0]) == 22
    r2 = runner.invoke(
        app,
        ["batch", str(b), str(root), "--out", str(out), "-n", "2", "--task", "report"],
        env={"M3D_EDGE_PRIVATE": "1"},
    )
    assert r2.exit_code == 10 and summary(out)["skipped"] == 1  # same aliases: resumed
    assert summary(out)["private"] is True and summary(out)["root"] is None


def test_private_run_replaces_uids_and_writes_no_seg(tiny_bundles, tmp_path):
    from m3d_edge.runtime.imaging.phantom import write_phantom_series

    study = write_phantom_series(tmp_path / "ct")
    out = tmp_path / "o"
    args = ["run", str(tiny_bundles["phi3"]), str(study), "--task", "segment", "--target", "liver"]
    r = runner.invoke(app, [*args, "--force-seg", "-n", "2", "-o", str(out), "--private"])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "result.json").read_text())
    import pydicom

    first = next(p for p in sorted(study.iterdir()) if p.is_file())
    uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    assert d["study"]["study_instance_uid"].startswith("2.25.") and uid not in json.dumps(d)
    assert not (out / "result_seg.dcm").exists() and any("privacy mode" in n for n in d["notes"])


# ------------------------------------------------------------------------------------------ exit codes


def test_non_utf8_question_is_a_usage_error(tiny_bundles, tmp_path):
    studies(tmp_path, 1)
    r = runner.invoke(
        app, ["run", str(tiny_bundles["phi3"]), str(tmp_path / "case0.npy"), "-q", "bad \udcff"]
    )
    assert r.exit_code == 2 and "--question: not valid UTF-8" in r.stderr, r.output


def test_chat_survives_a_non_utf8_line(tiny_bundles, tmp_path):
    studies(tmp_path, 1)
    r = runner.invoke(
        app,
        ["chat", str(tiny_bundles["phi3"]), str(tmp_path / "case0.npy"), "-n", "2"],
        input=b"\xff\xfe bad\nhello\n/quit\n",
    )
    assert r.exit_code == 0, r.output
    assert "not valid UTF-8" in r.stderr and "prefill" in r.stdout


MEMORY_SCRIPT = """
import resource, sys
from typer.testing import CliRunner
from m3d_edge.cli.app import app
from m3d_edge.runtime.pipeline import Pipeline

Pipeline.open(sys.argv[1])  # map the libraries and arenas first, then allow 2.2 GB more
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 2_200_000_000, resource.RLIM_INFINITY))
r = CliRunner().invoke(app, ["run", sys.argv[1], sys.argv[2], "--task", "report", "-n", "1"])
print("EXIT", r.exit_code)
print(r.output)
"""


def test_memory_error_from_a_declared_size_exits_3(tiny_bundles, tmp_path):
    """A NIfTI declaring 512x512x1024 voxels (a sparse file): reading it needs 2 GB of float32 copies."""
    nib = pytest.importorskip("nibabel")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((512, 512, 1024))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    hdr.set_qform(np.eye(4), code=1)
    path = tmp_path / "big.nii"
    with open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4)
        f.truncate(352 + 512 * 512 * 1024 * 2)
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tiny_bundles["phi3"]), str(path)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200"), timeout=300,
    )  # fmt: skip
    assert "EXIT 3" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert "unexpected" not in r.stdout
