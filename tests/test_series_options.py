"""What the errors tell users to do exists on the CLI: --series and --allow-resample on every study command."""

from __future__ import annotations

import json

import pytest
from test_cli import invoke

from m3d_edge.runtime.imaging.phantom import write_phantom_series


@pytest.fixture(scope="module")
def two_series(tmp_path_factory):
    """Two CT series in one folder: series 1 (12 slices) is chosen by default, series 7 (8 slices) is not."""
    import pydicom
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("two")
    write_phantom_series(root / "a", slices=12, rows=32, cols=32)
    b = write_phantom_series(root / "b", slices=8, rows=32, cols=32, seed=1)
    uid = generate_uid(entropy_srcs=["second series"])
    for f in b.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = uid, 7, "thin recon"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f.name, uid])
        ds.save_as(f, enforce_file_format=True)
    return root, uid


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    root = write_phantom_series(tmp_path_factory.mktemp("gap"), slices=10, rows=32, cols=32)
    (root / "CT0005.dcm").unlink()
    return root


@pytest.mark.parametrize("command", ["run", "chat", "batch", "inspect"])
def test_options_exist(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "--series" in r.stdout and "--allow-resample" in r.stdout


def test_series_selection_on_run_and_inspect(tiny_bundles, two_series, tmp_path):
    root, uid = two_series
    bundle = tiny_bundles["phi3"]
    for key in ("7", "thin", uid):
        r = invoke("run", bundle, root, "--task", "report", "-n", "2", "--json", "--series", key)
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["study"]["series_instance_uid"] == uid and d["study"]["shape_zyx"][0] == 8
    r = invoke("run", bundle, root, "--task", "report", "-n", "2", "--json")
    assert json.loads(r.stdout)["study"]["shape_zyx"][0] == 12  # default: the one with most slices
    r = invoke("run", bundle, root, "--task", "report", "--series", "99")
    assert r.exit_code == 3 and "no CT series matches '99'" in r.stderr
    r = invoke("inspect", root, "--series", "thin", "--json")
    chosen = [s for s in json.loads(r.stdout) if s["chosen"]]
    assert [s["series_instance_uid"] for s in chosen] == [uid]
    r = invoke("inspect", root, "--json")
    assert any("select it with --series" in s["reason"] for s in json.loads(r.stdout))


def test_allow_resample_on_run_chat_batch(tiny_bundles, gappy, tmp_path):
    bundle = tiny_bundles["phi3"]
    r = invoke("run", bundle, gappy, "--task", "report", "-n", "2")
    assert r.exit_code == 3 and "missing slices" in r.stderr and "--allow-resample" in r.stderr
    r = invoke("run", bundle, gappy, "--task", "report", "-n", "2", "--json", "--allow-resample")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["study"]["resampled"] is True
    r = invoke("chat", bundle, gappy, "-n", "2", "--allow-resample", input="What is shown?\n/quit\n")
    assert r.exit_code == 0 and r.stdout.count("prefill") == 1, r.output
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "gap").symlink_to(gappy, target_is_directory=True)
    r = invoke(
        "batch", bundle, studies, "--task", "report", "-n", "2", "--out", tmp_path / "o", "--allow-resample"
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "gap" / "result.json").read_text())["study"]["resampled"] is True
    r = invoke("inspect", gappy, "--json")
    assert "refused unless --allow-resample" in json.loads(r.stdout)[0]["problem"]
    r = invoke("inspect", gappy, "--allow-resample", "--json")
    assert "resampled: missing slices" in json.loads(r.stdout)[0]["reason"]
