"""``m3d-edge serve`` against a real uvicorn server on 127.0.0.1 (a subprocess), driven by httpx.

One server (module scope) answers most tests; a second one, over TLS with a short grace period, is
stopped with SIGTERM mid-stream. Answers are compared token for token with ``Pipeline.ask`` in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from m3d_edge.runtime.imaging import phantom  # noqa: E402
from m3d_edge.runtime.study_cache import StudyCache, state_nbytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "k-serve-test-full-0123456789abcdef"
METRICS_KEY = "k-serve-test-metrics-0123456789"
NEW = 6  # new tokens per question (tiny model: milliseconds each)
TASKS = {
    "report": {},
    "vqa": {"question": "Which organ is abnormal?"},
    "vqa_closed": {"question": "Which plane?", "choices": ["axial", "coronal", "sagittal", "oblique"]},
    "locate": {"target": "the liver"},
    "describe_region": {"box": [0.1, 0.2, 0.2, 0.5, 0.6, 0.6]},
    "segment": {"target": "liver", "force_seg": True},
    "refer_segment": {"question": "Where is the lesion?", "force_seg": True},
}


# ------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``m3d-edge serve`` in a subprocess; its stdout+stderr go to ``log``."""

    def __init__(self, bundle: Path, folder: Path, *args: str, scheme: str = "http", verify=True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.log = free_port(), folder / "server.log"
        keys = folder / "keys.txt"
        keys.write_text(f"# test keys\n{KEY}\n{METRICS_KEY} metrics\n")
        keys.chmod(0o600)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        env.pop("M3D_EDGE_API_KEYS", None)
        cmd = [sys.executable, "-m", "m3d_edge.cli.app", "serve", str(bundle), "--port", str(self.port)]
        cmd += ["--api-key-file", str(keys), *args]
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, headers=auth(KEY), timeout=60, verify=verify)
        self.wait_ready()

    def wait_ready(self, seconds: float = 120) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("server not ready in time")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def metric(self, name: str, default: float | None = None) -> float:
        text = self.client.get("/metrics").text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
        if not values and default is not None:
            return default
        assert values, f"{name} not in /metrics"
        return sum(values)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(server: Server, data: bytes, key: str = KEY) -> httpx.Response:
    return server.client.post("/v1/studies", content=data, headers=auth(key))


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif not line and name:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


def stable(d: dict) -> dict:
    """A result's JSON without what differs between two runs (timings) or places (file names)."""
    d = dict(d, timings=None, outputs=None, provenance=None)
    if d.get("mask"):
        d["mask"] = dict(d["mask"], files=None)
    return d


def zip_bytes(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """One study of each input kind on disk: npy, nii, nii.gz, a DICOM folder (and its zip)."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("serve-studies")
    npy = root / "case.npy"
    np.save(npy, phantom.ct_like_volume(0)[None])
    hu = phantom.phantom_hu(24, 96, 96, seed=1).astype(np.float32)  # (z, y, x)
    img = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), np.diag([-1.5, -1.5, 2.5, 1.0]))
    nib.save(img, root / "case.nii")
    nib.save(img, root / "case.nii.gz")
    dicom = phantom.write_phantom_series(root / "dicom", slices=20, rows=96, cols=96, seed=2)
    with zipfile.ZipFile(root / "dicom.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(dicom.iterdir()):
            zf.write(f, f"Doe^Jane/series 1/{f.name}")  # a patient name in the archive's paths
    (root / "allowed").mkdir()
    np.save(root / "allowed" / "server_side.npy", phantom.ct_like_volume(3)[None])
    return {"npy": npy, "nii": root / "case.nii", "nii.gz": root / "case.nii.gz", "dicom": dicom,
            "zip": root / "dicom.zip", "root": root / "allowed"}  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_bundles, studies, tmp_path_factory):
    srv = Server(
        tiny_bundles["phi3"],
        tmp_path_factory.mktemp("serve-main"),
        "--max-queue", "8", "--max-upload-mb", "12", "--max-unpacked-mb", "24", "--max-zip-entries", "500",
        "--cache-mb", "512", "--allowed-root", str(studies["root"]), "--timeout", "60",
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def uploaded(server, studies) -> dict[str, str]:
    """Study ids of the npy, NIfTI and DICOM-zip uploads."""
    ids = {}
    for kind in ("npy", "nii", "nii.gz", "zip"):
        r = upload(server, studies[kind].read_bytes())
        assert r.status_code in (200, 201), r.text
        ids[kind] = r.json()["study_id"]
    return ids


@pytest.fixture(scope="module")
def pipe(pipelines):
    return pipelines["phi3"]


def local_ask(pipe, study: Path, task: str, **extra):
    """``Pipeline.ask`` as ``m3d-edge run --json`` does it (with ``--out`` when there is a mask)."""
    import tempfile

    from m3d_edge.runtime.generate import SamplingParams
    from m3d_edge.runtime.outputs import write_outputs

    force = extra.pop("force_seg", False)
    params = SamplingParams(logit_bias=pipe.seg_bias(force))
    if "box" in extra:
        extra["box"] = tuple(extra["box"])
    result = pipe.ask(study, task=task, max_new_tokens=NEW, sampling=params, **extra)
    if result.mask is not None:
        write_outputs(result, tempfile.mkdtemp(prefix="serve-local-"))
    return result


# ------------------------------------------------------------------------------------------ study cache


def test_study_cache_evicts_least_recent_over_budget():
    class S:
        def __init__(self, mb: float) -> None:
            self.image = np.zeros(int(mb * 2**20), np.uint8)

    cache = StudyCache(budget_mb=2.5)
    cache.put("a", S(1))
    cache.put("b", S(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", S(1))  # 3 MB > 2.5: b (least recent) goes
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None
    big = S(5)
    cache.put("d", big)  # alone over budget: kept (it is the study in use), the others evicted
    assert list(cache._entries) == ["d"] and cache.last is big
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["entries"]) == (1, 1, 3, 1)
    assert s["bytes"] == state_nbytes(big) == 5 * 2**20 and s["hit_rate"] == 0.5
    assert cache.discard("d") and len(cache) == 0


def test_pipeline_keeps_studies_within_its_budget(pipe, studies, tmp_path):
    """Alternating between two studies re-runs the vision encoder only when the budget cannot hold both."""
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, phantom.ct_like_volume(5)[None])
    np.save(b, phantom.ct_like_volume(6)[None])
    saved = pipe.studies
    try:
        pipe.studies = StudyCache(budget_mb=512)
        first = [pipe.ask(s, task="report", max_new_tokens=2).timings["cached_study"] for s in (a, b, a, b)]
        assert first == [False, False, True, True]
        pipe.studies = StudyCache(budget_mb=0)  # the default: only the study in use
        second = [pipe.ask(s, task="report", max_new_tokens=2).timings["cached_study"] for s in (a, b, a, a)]
        assert second == [False, False, False, True]
        assert pipe.studies.stats()["evictions"] == 2
    finally:
        pipe.studies = saved


def test_api_keys_parse_with_scopes_and_match_in_constant_time():
    from m3d_edge.errors import PromptError
    from m3d_edge.serve.auth import load_api_keys, match_key

    keys = load_api_keys(f"# comment\n{KEY}\n\n{METRICS_KEY}\tmetrics, ask  # scraper\n")
    assert [sorted(k.scopes) for k in keys] == [["ask", "metrics", "studies"], ["ask", "metrics"]]
    assert match_key(METRICS_KEY, keys) is keys[1] and match_key(KEY, keys) is keys[0]
    assert match_key(KEY[:-1], keys) is None and match_key(None, keys) is None and match_key("", keys) is None
    assert KEY not in repr(keys)  # only digests are kept
    with pytest.raises(PromptError, match="line 1: unknown scope"):
        load_api_keys(f"{KEY} admin", "keys.txt")
    with pytest.raises(PromptError, match="at least 16"):
        load_api_keys("short")


# ------------------------------------------------------------------------------------------ the API


def test_health_needs_no_key_and_everything_else_does(server):
    bare = httpx.Client(base_url=server.url, timeout=30)
    assert bare.get("/healthz").json() == {"status": "ok"}
    ready = bare.get("/readyz").json()
    assert ready["status"] == "ready" and ready["verified"] is True
    for method, path in (("GET", "/metrics"), ("POST", "/v1/studies"), ("GET", "/v1/openapi.json")):
        r = bare.request(method, path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
    wrong = bare.get("/metrics", headers=auth("not-the-key-0123456789"))
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert bare.get("/metrics", headers={"X-API-Key": METRICS_KEY}).status_code == 200
    denied = bare.post("/v1/studies", content=b"x", headers=auth(METRICS_KEY))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
    spec = server.client.get("/v1/openapi.json").json()
    assert "/v1/studies/{study_id}/ask" in spec["paths"]
    assert bare.get("/docs").status_code == 404  # no UI that loads scripts from a CDN
    bare.close()


def test_upload_each_kind_gives_a_content_id(server, studies, uploaded):
    for kind, study_id in uploaded.items():
        data = studies[kind].read_bytes()
        assert study_id == hashlib.sha256(data).hexdigest()[:32]
        again = upload(server, data)
        assert (
            again.status_code == 200 and again.json()["study_id"] == study_id and not again.json()["created"]
        )
    info = server.client.get(f"/v1/studies/{uploaded['zip']}").json()
    assert info["kind"] == "dicom" and info["geometry"]["shape_zyx"] == [20, 96, 96]
    chosen = [s for s in info["series"] if s["chosen"]]
    assert len(chosen) == 1 and chosen[0]["slices"] == 20 and chosen[0]["reason"]
    assert "Doe" not in json.dumps(info)
    nii = server.client.get(f"/v1/studies/{uploaded['nii.gz']}").json()
    assert nii["kind"] == "nifti" and nii["geometry"]["spacing_zyx_mm"] == [2.5, 1.5, 1.5]


@pytest.mark.parametrize("kind", ["npy", "nii", "nii.gz", "zip"])
def test_answer_equals_pipeline_ask(server, studies, uploaded, pipe, kind):
    r = server.client.post(
        f"/v1/studies/{uploaded[kind]}/ask", json={"task": "vqa", **TASKS["vqa"], "max_new_tokens": NEW}
    )
    assert r.status_code == 200, r.text
    local = local_ask(pipe, studies["dicom" if kind == "zip" else kind], "vqa", **TASKS["vqa"])
    assert r.json()["tokens"] == local.tokens and r.json()["text"] == local.text
    assert stable(r.json()) == stable(local.to_dict())


def test_every_task_matches_the_cli_json(server, studies, uploaded, pipe):
    for task, extra in TASKS.items():
        r = server.client.post(
            f"/v1/studies/{uploaded['npy']}/ask", json={"task": task, **extra, "max_new_tokens": NEW}
        )
        assert r.status_code == 200, (task, r.text)
        local = local_ask(pipe, studies["npy"], task, **extra)
        got = r.json()
        assert got["tokens"] == local.tokens, task
        assert list(got) == list(local.to_dict()), task  # the same fields as `m3d-edge run --json`
        assert stable(got) == stable(local.to_dict()), task
        if task in ("segment", "refer_segment"):
            assert (
                got["mask"]["voxels"] == int(local.mask.sum())
                and got["outputs"]["nifti"] == "result_mask.nii.gz"
            )


def test_stream_a_report(server, studies, uploaded, pipe):
    body = {"task": "report", "max_new_tokens": 12, "stream": True}
    with server.client.stream("POST", f"/v1/studies/{uploaded['nii.gz']}/ask", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    names = [n for n, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"text"} and len(names) > 2
    result = events[-1][1]
    assert "".join(e["text"] for n, e in events[:-1]) == result["text"]
    local = pipe.ask(studies["nii.gz"], task="report", max_new_tokens=12)
    assert result["tokens"] == local.tokens


def test_result_files_and_delete(server, studies, uploaded):
    import nibabel as nib
    import pydicom

    sid = uploaded["zip"]
    r = server.client.post(
        f"/v1/studies/{sid}/ask", json={"task": "segment", "target": "liver", "force_seg": True,
                                        "max_new_tokens": 3, "preview": True},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    rid, result = r.headers["x-result-id"], r.json()
    base = f"/v1/studies/{sid}/results/{rid}"
    mask = server.client.get(f"{base}/mask.nii.gz")
    assert mask.status_code == 200
    img = nib.Nifti1Image.from_bytes(gzip.decompress(mask.content))
    assert int(np.asarray(img.dataobj).astype(bool).sum()) == result["mask"]["source_voxels"]
    seg = pydicom.dcmread(io.BytesIO(server.client.get(f"{base}/seg.dcm").content))
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != result["study"]["series_instance_uid"]
    assert server.client.get(f"{base}/montage.png").content[:8] == b"\x89PNG\r\n\x1a\n"
    report = server.client.get(f"{base}/report.html")
    assert report.status_code == 200 and "default-src 'none'" in report.headers["content-security-policy"]
    assert json.loads(server.client.get(f"{base}/result.json").content)["tokens"] == result["tokens"]
    for bad in (f"{base}/../../meta.json", f"{base}/passwd", f"/v1/studies/{sid}/results/{'0' * 32}/seg.dcm"):
        assert server.client.get(bad).status_code == 404
    # forget a study: its files and its cache entry go; the same bytes can come back
    gone = upload(server, studies["nii"].read_bytes() + b"")  # already there: no new study
    assert gone.status_code == 200
    d = server.client.delete(f"/v1/studies/{uploaded['nii']}")
    assert d.status_code == 200 and d.json()["deleted"] is True
    r = server.client.post(f"/v1/studies/{uploaded['nii']}/ask", json={"task": "report", "max_new_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_study"
    back = upload(server, studies["nii"].read_bytes())
    assert back.status_code == 201 and back.json()["study_id"] == uploaded["nii"]


def test_server_side_path_only_inside_the_allowed_root(server, studies, pipe):
    r = server.client.post("/v1/studies", json={"path": "server_side.npy"})
    assert r.status_code == 201, r.text
    sid = r.json()["study_id"]
    for bad in ("../case.npy", str(studies["npy"]), "/etc/passwd"):
        e = server.client.post("/v1/studies", json={"path": bad})
        assert e.status_code == 403 and e.json()["error"]["code"] == "path_outside_root", bad
    ans = server.client.post(f"/v1/studies/{sid}/ask", json={"task": "report", "max_new_tokens": NEW})
    assert ans.json()["tokens"] == local_ask(pipe, studies["root"] / "server_side.npy", "report").tokens


def _nifti_bomb() -> bytes:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 4000))  # 256 GB as float32, in a few hundred bytes
    hdr.set_data_dtype(np.float32)
    return gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 4096)


def _bomb() -> bytes:
    return zip_bytes({"a.dcm": b"\0" * (30 * 2**20)})  # 30 MB of zeros in about 30 kB; the limit is 24 MB


@pytest.mark.parametrize(
    "name,make,status,code",
    [
        ("oversized", lambda s: os.urandom(13 * 2**20), 413, "upload_too_large"),
        ("traversal", lambda s: zip_bytes({"ok/1.dcm": b"x", "../../evil.dcm": b"x"}), 422, "unsafe_archive"),
        ("absolute", lambda s: zip_bytes({"/tmp/evil.dcm": b"x"}), 422, "unsafe_archive"),
        ("bomb", lambda s: _bomb(), 422, "unsafe_archive"),
        (
            "entries",
            lambda s: zip_bytes({f"{i}": b"" for i in range(501)}, zipfile.ZIP_STORED),
            422,
            "unsafe_archive",
        ),
        ("not_dicom_zip", lambda s: zip_bytes({"a.txt": b"hello"}), 422, "bad_study"),
        ("broken_zip", lambda s: s["zip"].read_bytes()[:5000], 422, "bad_archive"),
        ("corrupt_nifti", lambda s: s["nii"].read_bytes()[:348] + b"\0" * 64, 422, "bad_study"),
        ("corrupt_npy", lambda s: s["npy"].read_bytes()[:4096], 422, "bad_study"),
        ("unknown_kind", lambda s: b"hello world" * 100, 415, "unsupported_media_type"),
        ("empty", lambda s: b"", 400, "empty_upload"),
    ],
)
def test_bad_uploads_are_refused_and_the_server_keeps_serving(
    server, studies, uploaded, name, make, status, code
):
    r = upload(server, make(studies))
    assert r.status_code == status, (name, r.text)
    err = r.json()["error"]
    assert err["code"] == code and err["status"] == status and err["message"]
    assert str(server.log.parent) not in err["message"] and "incoming" not in err["message"]
    ok = server.client.post(
        f"/v1/studies/{uploaded['npy']}/ask", json={"task": "report", "max_new_tokens": 2}
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"task": "diagnose"}, 400, "bad_request"),
        ({"task": "vqa_closed", "question": "q", "choices": ["a", "b"]}, 400, "bad_request"),
        ({"task": "describe_region", "box": [0, 0, 0, 2, 1, 1]}, 400, "bad_request"),
        ({}, 400, "bad_request"),
        ({"task": "report", "max_new_tokens": 5000}, 413, "context_too_long"),
        ({"task": "report", "unknown": 1}, 400, "bad_request"),
        ({"task": "report", "max_new_tokens": 1700, "timeout_s": 0.3}, 504, "timeout"),
    ],
)
def test_bad_questions_get_their_status(server, uploaded, body, status, code):
    r = server.client.post(f"/v1/studies/{uploaded['npy']}/ask", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    ok = server.client.post(
        f"/v1/studies/{uploaded['npy']}/ask", json={"task": "report", "max_new_tokens": 2}
    )
    assert ok.status_code == 200


def test_not_json_and_unknown_routes(server, uploaded):
    r = server.client.post(
        f"/v1/studies/{uploaded['npy']}/ask", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    assert server.client.get("/v2/nothing").json()["error"]["code"] == "not_found"
    assert server.client.post("/v1/studies/../../etc/ask", json={"task": "report"}).status_code == 404


def test_disconnect_mid_stream_frees_the_slot(server, uploaded):
    before = server.metric('m3d_cancelled_requests_total{reason="disconnect"}', default=0)
    body = {"task": "report", "max_new_tokens": 1700, "stream": True}
    with server.client.stream("POST", f"/v1/studies/{uploaded['npy']}/ask", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one delta, then hang up
    end = time.monotonic() + 20
    while time.monotonic() < end and server.metric("m3d_queue_depth") > 0:
        time.sleep(0.05)
    assert server.metric("m3d_queue_depth") == 0
    assert server.metric('m3d_cancelled_requests_total{reason="disconnect"}') == before + 1


def test_load_50_requests_over_3_studies(server, uploaded):
    ids = [uploaded["npy"], uploaded["nii.gz"], uploaded["zip"]]
    for sid in ids:  # warm: every study prepared once, so RSS measures the steady state
        assert (
            server.client.post(
                f"/v1/studies/{sid}/ask", json={"task": "vqa", **TASKS["vqa"], "max_new_tokens": NEW}
            ).status_code
            == 200
        )
    rss_before = server.rss_kb()
    hits0, misses0 = (
        server.metric("m3d_study_cache_hits_total"),
        server.metric("m3d_study_cache_misses_total"),
    )

    async def one(client, i):
        body = {"task": "vqa", "question": f"Question {i % 5}?", "max_new_tokens": NEW}
        return await client.post(f"/v1/studies/{ids[i % 3]}/ask", json=body)

    async def run():
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server.url, headers=auth(KEY), timeout=60, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(50)))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 8
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) > 0
    assert server.metric("m3d_queue_depth") == 0
    rss_after = server.rss_kb()
    hits = server.metric("m3d_study_cache_hits_total") - hits0
    misses = server.metric("m3d_study_cache_misses_total") - misses0
    print(f"load: {codes.count(200)} x 200, {codes.count(503)} x 503; RSS {rss_before} -> {rss_after} kB; "
          f"cache hit rate {hits / max(hits + misses, 1):.2f} ({hits:.0f}/{hits + misses:.0f})")  # fmt: skip
    assert abs(rss_after - rss_before) <= 0.10 * rss_before
    assert hits == codes.count(200) and misses == 0  # every study stayed in the cache


def test_logs_hold_no_keys_or_patient_data(server, uploaded):
    server.client.get("/metrics")  # at least one authenticated request logged
    log = server.log.read_text()
    assert "POST /v1/studies/{study_id}/ask 200" in log and f"study={uploaded['npy']}" in log
    for secret in (KEY, METRICS_KEY, "Doe", "Jane", "PHANTOM", "Which organ"):
        assert secret not in log, secret
    assert "Traceback" not in log


# ------------------------------------------------------------------------------------------ TLS + SIGTERM


def _self_signed(folder: Path) -> tuple[Path, Path]:
    crypto = pytest.importorskip("cryptography")  # noqa: F841
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_and_sigterm_mid_stream(tiny_bundles, studies, tmp_path):
    import ssl

    cert, key = _self_signed(tmp_path)
    data = tmp_path / "data"
    grace = 2
    srv = Server(
        tiny_bundles["phi3"], tmp_path / "srv", "--tls-cert", str(cert), "--tls-key", str(key),
        "--grace", str(grace), "--data-dir", str(data), scheme="https", verify=ssl.create_default_context(cafile=str(cert)),
    )  # fmt: skip
    try:
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=5)
        sid = upload(srv, studies["npy"].read_bytes()).json()["study_id"]
        body = {"task": "report", "max_new_tokens": 1700, "stream": True}
        events = []
        with srv.client.stream("POST", f"/v1/studies/{sid}/ask", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    break
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(
                httpx.TransportError
            ):  # the server cut the stream after its grace period
                events = [line for line in lines if line.startswith("event:")]
        code = srv.proc.wait(grace + 15)
        elapsed = time.monotonic() - t0
        log = srv.log.read_text()
        assert code == 0, log
        assert elapsed < grace + 10, elapsed
        assert "event: result" not in events  # 1700 tokens do not fit in the grace period: cancelled
        assert events[-1:] == ["event: error"], events
        assert "Shutting down" in log and "Traceback" not in log
        assert not [p for p in data.rglob("*") if ".partial" in p.name or p.name.startswith(".incoming")]
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "args,env,message",
    [
        ([], {}, "no API keys"),
        (["--no-auth", "--host", "0.0.0.0"], {}, "only allowed on a loopback address"),
        (["--tls-cert", "cert.pem"], {"M3D_EDGE_API_KEYS": KEY}, "--tls-cert and --tls-key go together"),
        (["--api-key-file", "missing-keys.txt"], {}, "cannot read the API key file"),
        ([], {"M3D_EDGE_API_KEYS": "short"}, "at least 16 characters"),
    ],
)
def test_serve_refuses_unsafe_or_incomplete_settings(tmp_path, monkeypatch, args, env, message):
    from typer.testing import CliRunner

    from m3d_edge.cli.app import app

    monkeypatch.delenv("M3D_EDGE_API_KEYS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "bundle"), *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
