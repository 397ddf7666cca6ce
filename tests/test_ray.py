"""Ray (the [ray] extra) on a local cluster this module starts: Ray Data batch against local batch, a killed
actor, a study that kills every actor, a killed driver, and two Ray Serve replicas against one Pipeline."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_like_volume

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from m3d_edge.jobs import run_batch  # noqa: E402
from m3d_edge.serve.ray_batch import RayBatchOptions, StudyWorker, run_ray_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASK = {"task": "report", "max_new_tokens": 3}
GOOD = ["case0", "case1", "case2", "case3"]
BAD = ["broken", "empty"]
CRASH_DIR = "M3D_TEST_CRASH_DIR"


class CrashingWorker(StudyWorker):
    """A real actor death (SIGKILL of its own process): once when ``arm-once`` exists, always on ``poison``."""

    def answer(self, row):
        d = Path(os.environ[CRASH_DIR])
        if row["status"] == "loaded":
            if row["name"] == "poison":
                (d / f"poison-attempt-{os.getpid()}").touch()
                os.kill(os.getpid(), signal.SIGKILL)
            if (d / "arm-once").exists() and not (d / "killed-once").exists():
                (d / "killed-once").write_text(row["name"])
                os.kill(os.getpid(), signal.SIGKILL)
        return super().answer(row)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    crash = tmp_path_factory.mktemp("crash")
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    ctx = ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {CRASH_DIR: str(crash), "PYTHONPATH": path}},
    )
    yield {"crash": crash, "address": ctx.address_info["gcs_address"]}
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Six studies, two of them bad (not a .npy; an empty folder)."""
    root = tmp_path_factory.mktemp("archive")
    for i, name in enumerate(GOOD):
        np.save(root / f"{name}.npy", ct_like_volume(i))
    (root / "broken.npy").write_bytes(b"not a numpy file")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def pipe(tiny_bundles):
    from m3d_edge.runtime.pipeline import Pipeline

    return Pipeline.open(tiny_bundles["phi3"])


def options(**kw) -> RayBatchOptions:
    return RayBatchOptions(**{"workers": 2, "num_cpus": 0.5, "load_cpus": 0.5, **kw})


def comparable(path: Path) -> dict:
    d = json.loads(path.read_text())
    d.pop("timings")  # seconds differ run to run; everything else must not
    return d


def errors(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    return sorted(({k: e[k] for k in ("study", "error", "type", "exit_code")} for e in lines), key=str)


def test_ray_batch_matches_local_batch_and_survives_a_killed_actor(
    cluster, tiny_bundles, archive, pipe, tmp_path
):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    s_local = run_batch(pipe, archive, local, dict(ASK), ("json",))
    (cluster["crash"] / "arm-once").touch()
    try:
        s_ray = run_ray_batch(
            tiny_bundles["phi3"], archive, on_ray, dict(ASK), ("json",), options(), worker_cls=CrashingWorker
        )
    finally:
        (cluster["crash"] / "arm-once").unlink()
    killed = (cluster["crash"] / "killed-once").read_text()
    assert killed in GOOD  # one actor really died on a study mid-run ...
    assert (
        (s_ray["ok"], s_ray["failed"], s_ray["skipped"])
        == (4, 2, 0)
        == (
            s_local["ok"],
            s_local["failed"],
            s_local["skipped"],
        )
    )  # fmt: skip  ... and the run completed, that study included
    assert s_ray["entries"] == s_local["entries"] and s_ray["key"] == s_local["key"]
    for name in GOOD:  # the same files, token for token
        assert sorted(p.name for p in (on_ray / name).iterdir()) == sorted(
            p.name for p in (local / name).iterdir()
        )
        assert comparable(on_ray / name / "result.json") == comparable(local / name / "result.json")
    assert errors(on_ray) == errors(local) and [e["study"] for e in errors(local)] == BAD
    assert not [p for p in on_ray.rglob("*") if ".partial-" in p.name]
    # resume is shared: local batch finds nothing left to do in the Ray output, and Ray in the local one
    again = run_batch(pipe, archive, on_ray, dict(ASK), ("json",))
    assert (again["skipped"], again["ok"], again["failed"]) == (4, 0, 2)


def test_a_study_that_kills_every_actor_is_retried_a_bounded_number_of_times(cluster, tiny_bundles, tmp_path):
    from m3d_edge.jobs.privacy import Privacy

    root, out = tmp_path / "DOE_JOHN_123", tmp_path / "out"
    root.mkdir()
    np.save(root / "poison.npy", ct_like_volume(5))
    np.save(root / "case0.npy", ct_like_volume(0))
    s = run_ray_batch(
        tiny_bundles["phi3"], root, out, dict(ASK), ("json",), options(workers=1, max_retries=1),
        private=True, worker_cls=CrashingWorker,
    )  # fmt: skip
    assert (s["ok"], s["failed"]) == (1, 1)
    assert len(list(cluster["crash"].glob("poison-attempt-*"))) == 2  # 1 try + max_retries=1, then given up
    (e,) = errors(out)
    alias = Privacy(out)  # privacy mode as in local batch: keyed aliases, no names or paths in the log
    assert e["study"] == alias.alias("poison") and e["type"] == "BackendError" and e["exit_code"] == 5
    assert (
        "no result after 2 attempt(s)" in e["error"]
        and "poison" not in e["error"]
        and "DOE" not in e["error"]
    )
    assert (out / alias.alias("case0") / "result.json").is_file() and not (out / "case0").exists()
    assert s["root"] is None and "DOE" not in (out / "batch.json").read_text()


def test_killed_driver_rerun_redoes_only_what_is_missing(cluster, tiny_bundles, archive, pipe, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "m3d_edge.cli.app", "batch", str(tiny_bundles["phi3"]), str(archive),
        "--task", "report", "-n", "3", "--out", str(out), "--ray", cluster["address"], "--workers", "1",
        "--worker-cpus", "0.5",
    ]  # fmt: skip
    log = tmp_path / "driver.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="120"))
        deadline = time.monotonic() + 150
        try:
            while time.monotonic() < deadline and proc.poll() is None and not any(out.glob("*/result.json")):
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)  # the driver dies mid-run; Ray ends its job's actors
            proc.wait()
    assert any(out.glob("*/result.json")), f"the driver wrote nothing: {log.read_text()[-3000:]}"
    before: dict[str, tuple[int, int]] = {}
    for _ in range(40):  # until whatever the old job had in flight has landed
        now = {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*/result.json")}
        if now == before:
            break
        before = now
        time.sleep(0.5)
    assert 0 < len(before) < len(GOOD), before
    rerun = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, COLUMNS="120"), timeout=300
    )
    assert rerun.returncode == 10, rerun.stdout[-2000:] + rerun.stderr[-2000:]  # 10: the two bad studies
    assert "4 done, 2 failed, 0 remaining" in rerun.stdout and "studies/s" in rerun.stdout
    s = json.loads((out / "batch.json").read_text())
    assert (s["skipped"], s["ok"], s["failed"]) == (len(before), len(GOOD) - len(before), 2)
    for name, stamp in before.items():  # written once: the rerun left them alone
        p = out / name / "result.json"
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    for name in GOOD:
        assert [p.name for p in (out / name).glob("*.json")] == ["result.json"]
        assert (
            json.loads((out / name / "result.json").read_text())["tokens"]
            == pipe.ask(archive / f"{name}.npy", **ASK).tokens
        )
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]


def test_two_serve_replicas_answer_like_one_pipeline(cluster, tiny_bundles, pipe, tmp_path):
    import httpx
    from ray import serve

    from m3d_edge.serve.config import ServeConfig
    from m3d_edge.serve.ray_serve import AFFINITY_HEADER, serve_app, start

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    config = ServeConfig(bundle=tiny_bundles["phi3"], no_auth=True, port=port, data_dir=tmp_path / "data")
    start(serve_app(config, replicas=2, num_cpus=0.5), config)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        ids, want = [], {}
        for i in range(2):
            buf = io.BytesIO()
            np.save(buf, ct_like_volume(i))
            r = httpx.post(f"{url}/studies", content=buf.getvalue(), timeout=60)
            assert r.status_code == 201, r.text
            ids.append(r.json()["study_id"])
            np.save(tmp_path / f"s{i}.npy", ct_like_volume(i))
            want[ids[-1]] = pipe.ask(tmp_path / f"s{i}.npy", task="report", max_new_tokens=4)

        def ask(study_id: str):
            r = httpx.post(
                f"{url}/studies/{study_id}/ask",
                json={"task": "report", "max_new_tokens": 4},
                headers={AFFINITY_HEADER: study_id},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            return study_id, r.headers["x-m3d-replica"], r.json()

        first = {sid: ask(sid)[1] for sid in ids}  # the first ask of a study pins it to a replica
        time.sleep(1.0)  # Serve's routers learn which replica holds which study
        with cf.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, ids * 3))
        for sid, replica, body in answers:
            assert body["tokens"] == want[sid].tokens and body["text"] == want[sid].text
            assert replica == first[sid] and body["timings"]["vision"] == 0.0  # affinity: encoder reused
        # without the header a request may land on the other replica; it still finds the study (shared data)
        for sid in ids:
            assert all(httpx.get(f"{url}/studies/{sid}", timeout=30).status_code == 200 for _ in range(4))
    finally:
        serve.shutdown()


def test_replicas_sharing_a_data_dir_find_each_others_studies(tmp_path):
    """What lets a Serve replica answer a study another replica stored (no header, or a moved replica)."""
    from m3d_edge.serve.errors import ApiError
    from m3d_edge.serve.uploads import StudyStore

    a, b = StudyStore(tmp_path), StudyStore(tmp_path)
    staged = a.scratch()
    np.save(staged / "study.npy", ct_like_volume(0))
    sid = "0123456789abcdef0123456789abcdef"
    a.add(sid, "npy", staged, "study.npy", None)
    assert b.get(sid).input == a.get(sid).input and b.get(sid).info == a.get(sid).info
    a.delete(sid)
    with pytest.raises(ApiError) as err:
        b.get(sid)  # deleted by the other one: gone here too
    assert err.value.status == 404
