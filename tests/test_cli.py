"""The m3d-edge CLI: every command, its error paths and exit codes (typer's CliRunner, in process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ct_like_volume
from typer.testing import CliRunner

from m3d_edge.cli.app import app
from m3d_edge.errors import BundleError

runner = CliRunner()
COMMANDS = ("demo", "tiny-checkpoint", "export", "inspect", "run", "chat", "batch", "bench", "calibrate")


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["phi3"]


@pytest.fixture(scope="module")
def npy_study(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("npy") / "case.npy"
    np.save(path, ct_like_volume(1))
    return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from m3d_edge.runtime.imaging.phantom import write_phantom_series

    return write_phantom_series(tmp_path_factory.mktemp("phantom"), slices=12, rows=48, cols=48)


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------ app


def test_version_and_help_document_exit_codes():
    r = invoke("--version")
    assert r.exit_code == 0 and "m3d-edge 0.1.0" in r.stdout
    r = invoke("--help")
    assert r.exit_code == 0 and "Exit codes" in r.stdout
    for cmd in COMMANDS:
        r = invoke(cmd, "--help")
        assert r.exit_code == 0, cmd
        assert "Examples" in r.stdout and "m3d-edge " + cmd in r.stdout, cmd


def test_bad_bundle_is_one_line_exit_4(tmp_path, npy_study):
    r = invoke("run", tmp_path, npy_study, "--task", "report")
    assert r.exit_code == 4
    assert "no manifest.json" in one_error_line(r)


def test_debug_shows_the_exception(tmp_path, npy_study):
    r = invoke("--debug", "run", tmp_path, npy_study, "--task", "report")
    assert isinstance(r.exception, BundleError)


def test_bad_study_exit_3(bundle, tmp_path):
    r = invoke("run", bundle, tmp_path / "missing.nii.gz", "--task", "report")
    assert r.exit_code == 3
    assert "no such file" in one_error_line(r)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 3), np.float32))
    r = invoke("run", bundle, bad, "--task", "report")
    assert r.exit_code == 3
    one_error_line(r)


def test_task_errors_exit_2(bundle, npy_study):
    r = invoke("run", bundle, npy_study, "--task", "bogus")
    assert r.exit_code == 2 and "unknown task" in one_error_line(r)
    r = invoke("run", bundle, npy_study, "--task", "segment")  # no target
    assert r.exit_code == 2 and "needs a target" in one_error_line(r)
    r = invoke("run", bundle, npy_study)  # neither task nor question
    assert r.exit_code == 2
    r = invoke("run", bundle, npy_study, "--task", "describe_region", "--box", "1,2,3")
    assert r.exit_code == 2 and "--box" in one_error_line(r)
    r = invoke("run", bundle, npy_study, "--provider", "quantum", "--task", "report")
    assert r.exit_code == 2  # click's usage error for a bad choice


def test_other_error_classes(bundle, npy_study, monkeypatch):
    import onnxruntime as ort

    r = invoke("run", bundle, npy_study, "--task", "report", "-n", "5000")
    assert r.exit_code == 7 and "context length" in one_error_line(r)  # GenerationError
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        r = invoke("run", bundle, npy_study, "--task", "report", "--provider", "cuda")
        assert r.exit_code == 5 and "CUDAExecutionProvider" in one_error_line(r)  # BackendError

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("m3d_edge.cli.commands.ask.open_pipeline", boom)
    r = invoke("run", bundle, npy_study, "--task", "report")
    assert r.exit_code == 1 and "unexpected RuntimeError: boom" in one_error_line(r)


# ------------------------------------------------------------------------------------------ run


def test_run_json_has_the_schema(bundle, npy_study, tmp_path):
    out = tmp_path / "out"
    r = invoke(
        "run", bundle, npy_study, "--task", "segment", "--target", "liver", "--force-seg",
        "-n", "6", "--json", "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["schema"] == "m3d-edge/result/1"
    for key in ("question", "task", "target", "text", "tokens", "stop_reason", "study", "box", "mask"):
        assert key in d
    assert d["target"] == "liver" and d["study"]["kind"] == "npy"
    t = d["timings"]
    for key in ("vision", "seg_encoder", "prefill", "decode_steps", "decode_seconds", "seg_decoder", "total"):
        assert key in t
    assert d["provenance"]["bundle_id"] and d["provenance"]["precision"]["decoder"] == "fp32"
    assert d["mask"]["shape"] == [32, 256, 256]
    assert (out / "result.json").is_file() and (out / "result_mask.nii.gz").is_file()
    written = np.asarray(nib.load(out / "result_mask.nii.gz").dataobj)
    assert d["mask"]["voxels"] == int(np.count_nonzero(written))  # the count of the mask that was written
    assert not (out / "result_seg.dcm").exists()  # not a DICOM study
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["mask"]["files"] == {"nifti": "result_mask.nii.gz"}


def test_run_dicom_writes_seg_and_streams(bundle, phantom, tmp_path):
    out = tmp_path / "out"
    r = invoke(
        "run", bundle, phantom, "--task", "segment", "--target", "liver", "--force-seg",
        "-n", "4", "--stream", "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "[SEG]" in r.stdout and "wrote seg" in r.stdout
    d = json.loads((out / "result.json").read_text())
    assert d["study"]["kind"] == "dicom" and d["study"]["series_instance_uid"]
    assert d["mask"]["files"]["seg"] == "result_seg.dcm"
    assert "PHANTOM" not in (out / "result.json").read_text()  # no patient identifiers
    import pydicom

    seg = pydicom.dcmread(out / "result_seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == d["study"]["series_instance_uid"]


def test_run_sampling_options(bundle, npy_study):
    args = ("run", bundle, npy_study, "-q", "What is shown?", "-n", "5", "--sample", "--seed", "3", "--json")
    a, b = invoke(*args, "--top-k", "50", "--top-p", "0.9"), invoke(*args, "--top-k", "50", "--top-p", "0.9")
    assert a.exit_code == 0, a.output
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]  # seeded
    r = invoke(*args, "--temperature", "0")
    assert r.exit_code == 2


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_bundle(bundle, tmp_path):
    r = invoke("inspect", bundle)
    assert r.exit_code == 0, r.output
    assert "integrity: ok" in r.stdout and "decoder" in r.stdout and "token ids" in r.stdout
    r = invoke("inspect", bundle, "--json")
    d = json.loads(r.stdout)
    assert set(d["graphs"]) == {"vision", "decoder", "decoder_std", "seg_encoder", "seg_decoder"}
    assert d["token_ids"]["seg"] == 32014 and d["dims"]["family"] == "phi3"
    assert d["calibration"] == {}


def test_inspect_bundle_with_calibration_and_corruption(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "calibration").mkdir()
    (copy / "calibration" / "vision.int8.json").write_text(json.dumps({"graph": "vision", "cosine": 0.999}))
    r = invoke("inspect", copy)
    assert r.exit_code == 0 and "vision.int8.json" in r.stdout and "cosine=0.999" in r.stdout
    with open(copy / "vision.onnx", "ab") as f:
        f.write(b"x")
    r = invoke("inspect", copy)
    assert "FAILED" in r.stdout and "vision.onnx is corrupted" in r.stdout
    r = invoke("run", copy, bundle, "--task", "report")
    assert r.exit_code == 4 and "corrupted" in one_error_line(r)


def test_inspect_study(phantom, npy_study, tmp_path):
    r = invoke("inspect", phantom)
    assert r.exit_code == 0, r.output
    assert "would use: series 1" in r.stdout and "chosen" in r.stdout
    r = invoke("inspect", phantom, "--json")
    series = json.loads(r.stdout)
    assert len(series) == 1 and series[0]["chosen"] and series[0]["n_slices"] == 12
    r = invoke("inspect", npy_study, "--json")
    assert json.loads(r.stdout)["kind"] == "npy"
    (tmp_path / "empty").mkdir()
    r = invoke("inspect", tmp_path / "empty")
    assert r.exit_code == 3


# ------------------------------------------------------------------------------------------ chat


def test_chat_piped_stdin(bundle, npy_study):
    session = "What is shown?\n\n/task segment liver\n/task bogus x\n/help\n/nope\n/task report\n/quit\n"
    r = invoke("chat", bundle, npy_study, "-n", "4", "--force-seg", input=session)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("prefill") == 3  # three answered turns
    assert "mask" in r.stdout
    assert "unknown task 'bogus'" in r.stderr and "unknown command '/nope'" in r.stderr
    r = invoke("chat", bundle, npy_study, "-n", "2", input="hello\n")  # EOF ends the chat
    assert r.exit_code == 0


# ------------------------------------------------------------------------------------------ bench


def test_bench_json(bundle):
    r = invoke("bench", bundle, "--iters", "1", "--warmup", "0", "-n", "3", "--threads", "1", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for stage in ("vision", "seg_encoder", "seg_decoder", "prefill", "ttft", "decode_tokens_per_s"):
        assert set(d["stages"][stage]) >= {"p50", "p90", "p99", "n"}
    assert d["prompt_tokens"] > 256 and d["new_tokens"] == 3
    assert d["provider"] == ["CPUExecutionProvider"] and d["peak_rss_bytes"] > 0
    r = invoke("bench", bundle, "--iters", "1", "--warmup", "0", "-n", "2")
    assert r.exit_code == 0 and "ttft" in r.stdout and "peak RSS" in r.stdout


# ------------------------------------------------------------------------------------------ calibrate


def test_calibrate_runs_the_real_quantizers(bundle, tmp_path):
    """`calibrate --force` on the tiny bundle: variants and reports land in the manifest, hashes still verify."""
    import shutil

    from m3d_edge.bundle import read_manifest

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = tmp_path / "data"
    data.mkdir()
    for s in range(3):
        np.save(data / f"s{s}.npy", ct_like_volume(20 + s))
    r = invoke("calibrate", copy, "--data", data, "--samples", "2", "--force")
    assert r.exit_code == 0, r.output
    m = read_manifest(copy)  # verifies every hash, reports included
    assert {"int8", "int4"} <= set(m.graphs["decoder"].variants) and "int8" in m.graphs["vision"].variants
    assert (copy / m.graphs["decoder"].variants["int8"]["report"]).is_file()


def test_calibrate_without_data_is_one_line(bundle, tmp_path):
    r = invoke("calibrate", bundle, "--data", tmp_path / "missing")
    assert r.exit_code == 3
    assert "not a folder of calibration studies" in one_error_line(r)


# ------------------------------------------------------------------------------------------ export


def test_export_errors_and_table(tiny_checkpoints, bundle, tmp_path, monkeypatch):
    r = invoke("export", tmp_path / "nothing", "-o", tmp_path / "b")
    assert r.exit_code == 6
    one_error_line(r)
    r = invoke("export", tiny_checkpoints["phi3"], "-o", bundle)  # already a bundle
    assert r.exit_code == 6 and "--overwrite" in one_error_line(r)

    from m3d_edge.export import exporter

    def fake_export(ckpt, out, *, allow_pickle, overwrite, validate, progress, **options):
        for name in ("vision", "decoder"):
            progress(name, "start")
            progress(name, "done")
        graphs = [exporter.GraphReport("vision", 1.5, 2048, 1e-6), exporter.GraphReport("decoder", 0.5, 4096)]
        return exporter.ExportReport(bundle=Path(out), graphs=graphs, seconds=2.0)

    monkeypatch.setattr(exporter, "export_bundle", fake_export)
    r = invoke("export", tiny_checkpoints["phi3"], "-o", tmp_path / "b", "--no-validate")
    assert r.exit_code == 0, r.output
    assert "vision" in r.stdout and "1.00e-06" in r.stdout and "total" in r.stdout


def test_tiny_checkpoint_command(tmp_path):
    r = invoke("tiny-checkpoint", tmp_path / "ck", "--family", "llama", "--seed", "1")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model_type"] == "lamed_llama"
    r = invoke("tiny-checkpoint", tmp_path / "ck2", "--preset", "huge")
    assert r.exit_code == 2


# ------------------------------------------------------------------------------------------ demo


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = invoke("demo", "--out", out, "-n", "4")
    assert r.exit_code == 0, r.output
    assert "weights are random" in r.stdout and "logit bias" in r.stdout and "latency" in r.stdout
    res = out / "results"
    for stem in ("report", "locate", "segment"):
        assert json.loads((res / f"{stem}.json").read_text())["task"] == stem
    assert (res / "segment_mask.nii.gz").is_file() and (res / "segment_seg.dcm").is_file()
    seg = json.loads((res / "segment.json").read_text())
    assert seg["mask"]["files"] == {"nifti": "segment_mask.nii.gz", "seg": "segment_seg.dcm"}
    assert seg["study"]["kind"] == "dicom"
    # the demo model's SegVol head follows the phantom's liver: a real outline, mapped back to the series
    import nibabel as nib

    mask = np.asarray(nib.load(res / "segment_mask.nii.gz").dataobj).transpose(2, 1, 0).astype(bool)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 128, 128)), indexing="ij")
    liver = ((x + 0.35) / 0.33) ** 2 + ((y + 0.05) / 0.33) ** 2 + (z / 0.75) ** 2 < 1  # phantom.phantom_hu
    assert mask.shape == liver.shape and mask.sum() < 0.1 * mask.size
    assert 2 * (mask & liver).sum() / (mask.sum() + liver.sum()) > 0.85


def test_build_engines_and_trt_provider_refuse_without_tensorrt(bundle, npy_study):
    pytest.importorskip("onnxruntime")
    if "tensorrt" in sys.modules or __import__("importlib").util.find_spec("tensorrt"):
        pytest.skip("tensorrt is installed here")
    res = runner.invoke(app, ["build-engines", str(bundle)])
    assert res.exit_code == 5
    assert "pip install m3d-edge[gpu]" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["run", str(bundle), str(npy_study), "--task", "report", "--provider", "trt"])
    assert res.exit_code == 5 and "tensorrt" in res.output
