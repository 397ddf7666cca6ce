"""Bundle integrity: every path in a manifest stays inside the bundle, and every file opened is hashed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from m3d_edge.bundle import MANIFEST, read_manifest, sha256_file
from m3d_edge.cli.app import app
from m3d_edge.errors import BundleError
from m3d_edge.runtime.pipeline import Pipeline

runner = CliRunner()


@pytest.fixture
def bundle(tiny_bundles, tmp_path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["phi3"], b)
    return b


def edit(bundle: Path, fn) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    fn(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def test_pristine_bundle_reads(bundle):
    assert read_manifest(bundle).graphs["vision"].file == "vision.onnx"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "sub/../../x.onnx"])
def test_graph_file_outside_bundle_refused(bundle, bad):
    def fn(m):
        m["graphs"]["vision"]["file"] = bad
        m["graphs"]["vision"]["sha256"] = {bad: "0" * 64}

    edit(bundle, fn)
    for verify in (True, False):
        with pytest.raises(BundleError, match="outside the bundle"):
            read_manifest(bundle, verify=verify)


def test_modified_graph_outside_bundle_does_not_run_and_inspect_says_so(bundle, tmp_path):
    outside = tmp_path / "evil.onnx"
    shutil.copy(bundle / "vision.onnx", outside)
    rel = "../evil.onnx"

    def fn(m):
        m["graphs"]["vision"]["file"] = rel
        m["graphs"]["vision"]["sha256"] = {rel: sha256_file(outside)}

    edit(bundle, fn)
    with pytest.raises(BundleError, match="outside the bundle"):
        Pipeline.open(bundle)
    r = runner.invoke(app, ["inspect", str(bundle)])
    assert r.exit_code == 4 and "integrity: ok" not in r.output and "outside the bundle" in r.stderr


def test_symlink_leading_out_refused(bundle, tmp_path):
    outside = tmp_path / "evil.onnx"
    shutil.copy(bundle / "vision.onnx", outside)
    (bundle / "vision.onnx").unlink()
    (bundle / "vision.onnx").symlink_to(outside)
    edit(bundle, lambda m: m["graphs"]["vision"].update(sha256={"vision.onnx": sha256_file(outside)}))
    with pytest.raises(BundleError, match=r"'vision\.onnx' is outside the bundle"):
        read_manifest(bundle)


def test_emptied_hash_list_refused(bundle):
    edit(bundle, lambda m: m["graphs"]["decoder"].update(sha256={}))
    with pytest.raises(BundleError, match=r"graph decoder \(decoder.onnx\) has no sha256"):
        read_manifest(bundle)
    r = runner.invoke(app, ["inspect", str(bundle)])
    assert r.exit_code == 4 and "integrity: ok" not in r.output


def test_hash_entries_outside_do_not_reveal_existence(bundle, tmp_path):
    (tmp_path / "exists.txt").write_text("x")
    messages = []
    for name in ("../exists.txt", "../does-not-exist.txt"):
        edit(bundle, lambda m, n=name: m["graphs"]["vision"]["sha256"].update({n: "0" * 64}))
        with pytest.raises(BundleError) as e:
            read_manifest(bundle)
        messages.append(str(e.value).replace(name, "NAME"))
        edit(bundle, lambda m, n=name: m["graphs"]["vision"]["sha256"].pop(n))
    assert messages[0] == messages[1] and "outside the bundle" in messages[0]
    assert "missing" not in messages[0] and "corrupted" not in messages[0]


def test_unhashed_external_data_refused(bundle):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(bundle / "vision.onnx"))
    onnx.save(model, str(bundle / "vision.onnx"), save_as_external_data=True, location="vision.data")
    edit(
        bundle,
        lambda m: m["graphs"]["vision"].update(sha256={"vision.onnx": sha256_file(bundle / "vision.onnx")}),
    )
    with pytest.raises(BundleError, match=r"reads external data 'vision\.data' that is not hashed"):
        read_manifest(bundle)
    edit(
        bundle,
        lambda m: m["graphs"]["vision"]["sha256"].update(
            {"vision.data": sha256_file(bundle / "vision.data")}
        ),
    )
    assert read_manifest(bundle).graphs["vision"].sha256.keys() == {"vision.onnx", "vision.data"}


def test_pickle_bearing_embed_table_is_a_bundle_error(bundle, tmp_path):
    np.save(bundle / "embed.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    edit(bundle, lambda m: m["embed"].update(sha256=sha256_file(bundle / "embed.npy")))
    with pytest.raises(BundleError, match=r"embed.npy: not a plain numeric .npy table"):
        Pipeline.open(bundle)
    np.save(tmp_path / "v.npy", np.zeros((32, 256, 256), np.float32))
    r = runner.invoke(app, ["run", str(bundle), str(tmp_path / "v.npy"), "--task", "report", "-n", "1"])
    assert r.exit_code == 4 and "unexpected" not in r.stderr, r.output


def test_bad_tokenizer_is_a_bundle_error(bundle, tmp_path):
    (bundle / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    edit(bundle, lambda m: m["tokenizer"].update(sha256=sha256_file(bundle / "tokenizer.json")))
    np.save(tmp_path / "v.npy", np.zeros((32, 256, 256), np.float32))
    r = runner.invoke(app, ["run", str(bundle), str(tmp_path / "v.npy"), "--task", "report", "-n", "1"])
    assert r.exit_code == 4 and "tokenizer.json: not a valid tokenizer.json" in r.stderr, r.output
    assert "unexpected" not in r.stderr
