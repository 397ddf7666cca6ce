"""M3D-CLIP retrieval: export parity, the torch-free Retriever, the faiss + SQLite index, search and eval CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from m3d_edge.bundle import MANIFEST, read_manifest
from m3d_edge.cli.app import app
from m3d_edge.errors import BundleError, ExportError, PromptError
from m3d_edge.export.clip import MIN_COSINE, infer_bert_config, load_clip, write_wordpiece_tokenizer
from m3d_edge.export.exporter import export_bundle
from m3d_edge.export.tiny_clip import tiny_vocab, write_tiny_clip_checkpoint
from m3d_edge.runtime.imaging import phantom
from m3d_edge.runtime.retrieval import Retriever, recall_at_k

faiss = pytest.importorskip("faiss")

from m3d_edge.runtime.retrieval_index import Record, StudyIndex, build_faiss_index  # noqa: E402

runner = CliRunner()
TEXTS = [
    "The liver shows a 3 cm hypodense lesion in segment 4.",
    "normal chest",
    "Bilateral pleural effusions with atelectasis of the lower lobes; no pneumothorax.",
    "kidney stone",
    "a",
]


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    return write_tiny_clip_checkpoint(tmp_path_factory.mktemp("clip") / "ckpt")


@pytest.fixture(scope="module")
def clip_bundle(clip_ckpt, tmp_path_factory):
    return export_bundle(clip_ckpt, tmp_path_factory.mktemp("clipb") / "bundle").bundle


@pytest.fixture(scope="module")
def retriever(clip_bundle):
    return Retriever.open(clip_bundle)


@pytest.fixture(scope="module")
def torch_clip(clip_ckpt):
    return load_clip(clip_ckpt)[0]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Six CT-like .npy studies (the M3D layout) in one folder, one per file."""
    root = tmp_path_factory.mktemp("studies")
    for i in range(6):
        np.save(root / f"s{i}.npy", phantom.ct_like_volume(i)[None])
    return root


@pytest.fixture(scope="module")
def built_index(clip_bundle, studies, tmp_path_factory):
    """An index of the six studies, built through the CLI (tests that change it work on a copy)."""
    index = tmp_path_factory.mktemp("index") / "idx"
    res = runner.invoke(app, ["index", "build", str(clip_bundle), str(studies), "-o", str(index)])
    assert res.exit_code == 0, res.output
    assert "│ indexed now               │     6 │" in res.output
    return index


# ------------------------------------------------------------------------------------------ export


def test_checkpoint_read_without_hub_bert_sizes_from_tensors(clip_ckpt, torch_clip):
    cfg = json.loads((clip_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "m3d_clip" and "num_hidden_layers" not in cfg  # no BERT sizes in config
    bert = torch_clip.language_encoder.config
    assert (bert.num_hidden_layers, bert.hidden_size, bert.num_attention_heads) == (2, 64, 1)
    assert (bert.vocab_size, bert.intermediate_size, bert.max_position_embeddings) == (
        len(tiny_vocab()),
        128,
        512,
    )
    from safetensors.torch import load_file

    state = load_file(str(clip_ckpt / "model.safetensors"))
    assert {k.split(".")[0] for k in state} == {
        "vision_encoder",
        "language_encoder",
        "mm_vision_proj",
        "mm_language_proj",
        "logit_scale",
    }
    assert "vision_encoder.cls_token" in state and "language_encoder.pooler.dense.weight" in state
    state.pop("language_encoder.encoder.layer.1.output.dense.weight")
    with pytest.raises(ExportError, match=r"layer\.1\.output\.dense\.weight"):
        from m3d_edge.export.checkpoint import check_keys

        check_keys(torch_clip.state_dict().keys(), state.keys(), clip_ckpt)
    bad = {"language_encoder.embeddings.word_embeddings.weight": torch.zeros(10, 70)}
    with pytest.raises(ExportError, match="not a multiple of the 64-wide heads"):
        infer_bert_config(
            {
                **bad,
                "language_encoder.embeddings.position_embeddings.weight": torch.zeros(8, 70),
                "language_encoder.embeddings.token_type_embeddings.weight": torch.zeros(2, 70),
                "language_encoder.encoder.layer.0.intermediate.dense.weight": torch.zeros(9, 70),
            },
            clip_ckpt,
        )


def test_retrieval_bundle_manifest(clip_bundle):
    m = read_manifest(clip_bundle)
    assert m.kind == "retrieval" and set(m.graphs) == {"image_encoder", "text_encoder"}
    assert m.dims.embed_dim == 64 and m.dims.max_text_len == 128 and m.embed == {}
    assert m.graphs["image_encoder"].inputs[0]["shape"] == ["batch", 1, 32, 256, 256]
    assert [t["name"] for t in m.graphs["text_encoder"].inputs] == ["input_ids", "attention_mask"]
    assert m.graphs["text_encoder"].outputs[0]["shape"] == ["batch", 64]
    assert min(m.source["export_cosine"].values()) >= MIN_COSINE
    from m3d_edge.runtime.pipeline import Pipeline

    with pytest.raises(BundleError, match="retrieval bundle"):
        Pipeline.open(clip_bundle)


def test_image_tower_matches_torch(retriever, torch_clip):
    vols = np.stack([phantom.ct_like_volume(i)[None] for i in range(2)])
    with torch.no_grad():
        ref = torch_clip.encode_image(torch.from_numpy(vols)).numpy()
    got = retriever.embed_volumes(vols)  # batch 2
    one = retriever.embed_image(vols[1])  # batch 1
    assert got.shape == (2, 64) and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosines(got, ref).min() >= MIN_COSINE and np.abs(got - ref).max() < 1e-4
    assert cosines(one, ref[1]) >= MIN_COSINE


def test_text_tower_matches_torch(retriever, torch_clip):
    ids, mask = retriever.tokenize(TEXTS)
    assert mask.sum(1).min() < mask.shape[1]  # some rows are padded
    with torch.no_grad():
        ref = torch_clip.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    got = retriever.embed_texts(TEXTS)
    assert cosines(got, ref).min() >= MIN_COSINE and np.abs(got - ref).max() < 1e-4


def test_tokenizer_matches_transformers_bert(clip_ckpt, retriever, tmp_path):
    from tokenizers import Tokenizer
    from transformers import BertTokenizer

    slow = BertTokenizer(str(clip_ckpt / "vocab.txt"), do_lower_case=True)
    for t in [*TEXTS, "Café 肺 RÉSUMÉ xyzzy!"]:
        assert retriever.tokenizer.encode(t).ids == slow(t)["input_ids"], t
    long = " ".join(["liver"] * 300)
    ids, _mask = retriever.tokenize([long])
    assert ids.shape == (1, 128) and ids[0, 0] == slow.cls_token_id and ids[0, -1] == slow.sep_token_id
    # a checkpoint with only tokenizer.json (no vocab.txt) converts to the same tokenizer
    only = tmp_path / "fast"
    only.mkdir()
    shutil.copy(retriever.bundle / "tokenizer.json", only / "tokenizer.json")
    write_wordpiece_tokenizer(only, tmp_path / "out.json")
    again = Tokenizer.from_file(str(tmp_path / "out.json"))
    assert [again.encode(t).ids for t in TEXTS] == [retriever.tokenizer.encode(t).ids for t in TEXTS]
    with pytest.raises(ExportError, match=r"no vocab\.txt or tokenizer\.json"):
        write_wordpiece_tokenizer(tmp_path, tmp_path / "none.json")


def test_text_embeddings_same_batched_or_one_by_one(retriever):
    batched = retriever.embed_texts(TEXTS, batch_size=32)
    single = np.stack([retriever.embed_text(t) for t in TEXTS])
    pairs = retriever.embed_texts(TEXTS, batch_size=2)
    # identical up to float32 summation order of differently shaped matrix products
    assert np.abs(batched - single).max() < 1e-6 and np.abs(pairs - single).max() < 1e-6
    assert (np.argsort(-(batched @ batched.T), 1) == np.argsort(-(single @ single.T), 1)).all()


def test_malformed_queries(retriever):
    for bad in ("", "   ", None, 3):
        with pytest.raises(PromptError, match="non-empty string"):
            retriever.embed_text(bad)  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="one string"):
        retriever.embed_texts("liver")
    from m3d_edge.errors import StudyError

    with pytest.raises(StudyError, match="is not"):
        retriever.embed_image(np.zeros((16, 16), np.float32))


def test_int8_image_encoder_through_the_cosine_gate(clip_bundle, studies, tmp_path):
    from m3d_edge.calibration import calibrate_bundle

    bundle = shutil.copytree(clip_bundle, tmp_path / "b")
    report = calibrate_bundle(bundle, studies, samples=2, held_out=1, speed_runs=1)
    v = report.variant("image_encoder", "int8")
    assert v.passed and v.kept and v.default and v.metrics["embedding_cosine"] >= 0.995
    m = read_manifest(bundle)
    assert m.graphs["image_encoder"].default == "int8" and m.graphs["text_encoder"].variants == {}
    r8, r32 = Retriever.open(bundle), Retriever.open(bundle, precision="fp32")
    assert r8.precisions["image_encoder"] == "int8" and r32.precisions["image_encoder"] == "fp32"
    vol = phantom.ct_like_volume(9)[None]
    assert cosines(r8.embed_image(vol), r32.embed_image(vol)) >= 0.995
    doc = json.loads((bundle / v.report).read_text())
    assert doc["quantization"]["op_types"] == ["MatMul", "Gemm"] and doc["passed"] is True


# ------------------------------------------------------------------------------------------ index


def _unit(n, d, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _records(n, start=0):
    return [Record(f"k{i}", f"h{i}", name=f"s{i}", study_uid=f"1.2.{i}") for i in range(start, start + n)]


@pytest.mark.parametrize("approximate", [False, True])
def test_search_equals_brute_force_numpy(tmp_path, approximate):
    vecs, queries = _unit(500, 32), _unit(5, 32, seed=1)
    idx = StudyIndex.create(tmp_path / "i", "bundle-a", 32, approx_min=100 if approximate else 10**9)
    ids = np.asarray(idx.add(_records(500), vecs))
    kind = type(idx.faiss_index()).__name__
    assert kind == ("IndexIVFFlat" if approximate else "IndexIDMap2")
    nlist = faiss.extract_index_ivf(idx.faiss_index()).nlist if approximate else None
    hits = idx.search(queries, top_k=10, nprobe=nlist)  # every list scanned: exact
    brute = queries @ vecs.T
    for q, row in enumerate(hits):
        want = np.argsort(-brute[q], kind="stable")[:10]
        assert [h.id for h in row] == ids[want].tolist()
        assert np.allclose([h.score for h in row], brute[q, want], atol=1e-5)
        assert row[0].name == f"s{want[0]}" and row[0].study_uid == f"1.2.{want[0]}"


def test_add_remove_round_trip_and_reopen(tmp_path):
    vecs = _unit(20, 16)
    with StudyIndex.create(tmp_path / "i", "bundle-a", 16) as idx:
        ids = idx.add(_records(10), vecs[:10])
        more = idx.add(_records(10, start=10), vecs[10:])
        assert len(idx) == 20 and more[0] == ids[-1] + 1
        top = idx.search(vecs[3], 1)[0][0]
        assert top.id == ids[3] and top.score == pytest.approx(1.0, abs=1e-5)
        assert idx.remove([ids[3], 999]) == [ids[3]]
        assert all(h.id != ids[3] for h in idx.search(vecs[3], 20)[0]) and len(idx) == 19
        gen = idx.generation
        assert [p.name for p in idx.path.glob("*.faiss")] == [f"vectors-{gen}.faiss"]
        assert idx.resolve(["s5", "1.2.6", str(ids[7])]) == [ids[5], ids[6], ids[7]]
        with pytest.raises(PromptError, match="no indexed study"):
            idx.resolve(["nobody"])
    with StudyIndex.open(tmp_path / "i") as idx:
        assert len(idx) == 19 and idx.search(vecs[4], 1)[0][0].id == ids[4]
        new = idx.add(_records(1, start=3), vecs[3:4])  # the removed study back: a new id, never reused
        assert new[0] == more[-1] + 1 and idx.search(vecs[3], 1)[0][0].id == new[0]
        # a stale or missing faiss file is rebuilt from SQLite
        for p in idx.path.glob("*.faiss"):
            p.unlink()
    with StudyIndex.open(tmp_path / "i") as idx:
        assert idx.search(vecs[3], 1)[0][0].id == new[0] and len(idx) == 20
        with pytest.raises(PromptError, match="expected"):
            idx.search(np.zeros(7, np.float32))


def test_index_refuses_another_bundle(tmp_path, clip_bundle, studies, built_index):
    StudyIndex.create(tmp_path / "i", "bundle-a", 16).close()
    with pytest.raises(BundleError, match="built with bundle bundle-a"):
        StudyIndex.create(tmp_path / "i", "bundle-b", 16)
    # through the CLI: a copy of the bundle with another id
    other = shutil.copytree(clip_bundle, tmp_path / "other")
    m = json.loads((other / MANIFEST).read_text())
    m["bundle_id"] = "m3d-clip-000000000000"
    (other / MANIFEST).write_text(json.dumps(m))
    index = tmp_path / "idx"
    assert (
        runner.invoke(app, ["index", "build", str(clip_bundle), str(studies), "-o", str(index)]).exit_code
        == 0
    )
    for cmd in (
        ["search", str(index), "--text", "liver", "--bundle", str(other)],
        ["index", "build", str(other), str(studies), "-o", str(index)],
    ):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 4 and "embeddings of different models are not comparable" in res.output


def test_cli_search_add_remove(tmp_path, studies, retriever, built_index):
    index = shutil.copytree(built_index, tmp_path / "idx")
    res = runner.invoke(app, ["search", str(index), "--text", TEXTS[0], "--top-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    vecs = np.stack([retriever.embed_image(studies / f"s{i}.npy") for i in range(6)])
    want = np.argsort(-(vecs @ retriever.embed_text(TEXTS[0])), kind="stable")[:3]
    assert [r["name"] for r in out["results"]] == [f"s{i}" for i in want]
    assert out["bundle_id"] == retriever.bundle_id and out["results"][0]["source_path"].endswith(".npy")
    res = runner.invoke(app, ["search", str(index), "--study", str(studies / "s2.npy"), "--json"])
    top = json.loads(res.output)["results"][0]
    assert top["name"] == "s2" and top["score"] == pytest.approx(1.0, abs=1e-5)
    # image-to-text over a candidate-reports file
    reports = tmp_path / "reports.txt"
    reports.write_text("\n".join(TEXTS) + "\n\n")
    res = runner.invoke(
        app, ["search", str(index), "--study", str(studies / "s1.npy"), "--reports", str(reports), "--json"]
    )
    rows = json.loads(res.output)["results"]
    scores = retriever.embed_texts(TEXTS) @ vecs[1]
    assert [r["line"] for r in rows] == (np.argsort(-scores, kind="stable") + 1).tolist()
    res = runner.invoke(app, ["index", "remove", str(index), "s0", "2"])
    assert res.exit_code == 0 and "removed 2" in res.output
    res = runner.invoke(app, ["search", str(index), "--text", "liver", "-k", "10", "--json"])
    assert sorted(r["name"] for r in json.loads(res.output)["results"]) == ["s2", "s3", "s4", "s5"]
    res = runner.invoke(app, ["index", "add", str(index), str(studies / "s0.npy")])
    assert res.exit_code == 0 and "│ indexed now               │     1 │" in res.output
    res = runner.invoke(app, ["search", str(index), "--study", str(studies / "s0.npy"), "-k", "1", "--json"])
    assert json.loads(res.output)["results"][0]["name"] == "s0"
    res = runner.invoke(app, ["index", "add", str(index), str(studies / "s0.npy")])
    assert "│ already indexed (skipped) │     1 │" in res.output
    res = runner.invoke(app, ["inspect", str(retriever.bundle)])
    assert res.exit_code == 0 and "integrity: ok" in res.output
    res = runner.invoke(app, ["inspect", str(retriever.bundle), "--json"])
    info = json.loads(res.output)
    assert set(info["graphs"]) == {"image_encoder", "text_encoder"} and info["dims"]["embed_dim"] == 64


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one of --text"),
        (["--text", "a", "--study", "x.npy"], "exactly one of --text"),
        (["--text", "  "], "--text is empty"),
        (["--text", "a", "--reports", "r.txt"], "give --study PATH with it"),
    ],
)
def test_cli_malformed_query(tmp_path, args, message):
    res = runner.invoke(app, ["search", str(tmp_path), *args])
    assert res.exit_code == 2 and message in res.output


def test_cli_search_errors_name_the_problem(tmp_path, studies, built_index):
    res = runner.invoke(app, ["search", str(tmp_path / "nope"), "--text", "a"])
    assert res.exit_code == 4 and "not an m3d-edge index" in res.output
    index = built_index
    res = runner.invoke(app, ["search", str(index), "--study", str(tmp_path / "missing.npy")])
    assert res.exit_code == 3 and "missing.npy: no such file" in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    res = runner.invoke(
        app, ["search", str(index), "--study", str(studies / "s0.npy"), "--reports", str(empty)]
    )
    assert res.exit_code == 2 and "no candidate reports" in res.output


def test_index_build_privacy_and_failed_studies(tmp_path, clip_bundle, studies):
    root = shutil.copytree(studies, tmp_path / "studies")
    (root / "broken.npy").write_bytes(b"not a volume")
    index = tmp_path / "idx"
    res = runner.invoke(app, ["index", "build", str(clip_bundle), str(root), "-o", str(index), "--private"])
    assert res.exit_code == 10, res.output
    errors = [json.loads(ln) for ln in (index / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["study"].startswith("source:") and errors[0]["exit_code"] == 3
    assert "broken" not in (index / "errors.jsonl").read_text() and "broken" not in res.output
    rows = sqlite3.connect(index / "index.sqlite").execute(
        "SELECT name, source_path, content_hash FROM studies"
    )
    rows = rows.fetchall()
    assert len(rows) == 6 and all(n is None and p is None and len(h) == 64 for n, p, h in rows)


def test_index_build_resumes_after_sigkill(tmp_path, clip_bundle, studies):
    root = tmp_path / "studies"
    root.mkdir()
    for i in range(10):  # ten studies, so the kill lands mid-way
        shutil.copy(studies / f"s{i % 6}.npy", root / f"t{i}.npy")
    index = tmp_path / "idx"
    cmd = [sys.executable, "-m", "m3d_edge.cli.app", "index", "build", str(clip_bundle), str(root)]
    cmd += ["-o", str(index), "--batch-size", "1"]
    env = dict(os.environ, COLUMNS="120")
    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with sqlite3.connect(index / "index.sqlite", timeout=0.1) as db:
                        if db.execute("SELECT count(*) FROM studies").fetchone()[0] >= 1:
                            break
                except sqlite3.Error:
                    pass
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    with StudyIndex.open(index) as idx:
        done = len(idx)
        ids, vecs = idx.vectors()
        assert 1 <= done < 10 and len(ids) == done  # every committed study has its vector
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    skipped = re.search(r"already indexed \(skipped\)\s*│\s*(\d+)", rerun.stdout)
    assert skipped and int(skipped.group(1)) == done, rerun.stdout
    with StudyIndex.open(index) as idx:
        assert len(idx) == 10 and idx.faiss_index().ntotal == 10
        names = sorted(r[0] for r in idx.db.execute("SELECT name FROM studies"))
        assert names == sorted(f"t{i}" for i in range(10))
        ids, vecs = idx.vectors()
        hashes = dict(idx.db.execute("SELECT name, content_hash FROM studies").fetchall())
    assert hashes["t0"] == hashes["t6"] and hashes["t0"] != hashes["t1"]  # same volume, same hash
    r = Retriever.open(clip_bundle)
    assert np.abs(vecs[0] - r.embed_image(root / "t0.npy")).max() < 1e-6
    assert not [p for p in index.iterdir() if ".partial-" in p.name]


# ------------------------------------------------------------------------------------------ eval


def test_recall_at_k_protocol():
    eye = np.eye(4)
    assert recall_at_k(eye) == {
        "image_to_text": {1: 1.0, 5: 1.0, 10: 1.0},
        "text_to_image": {1: 1.0, 5: 1.0, 10: 1.0},
    }
    s = np.array([[0.1, 0.9, 0.0], [0.0, 0.5, 0.4], [0.3, 0.2, 0.1]])
    # rows (image->text): ranks of the diagonal 2, 1, 3; columns (text->image): 2, 2, 2
    r = recall_at_k(s, ks=(1, 2))
    assert r["image_to_text"] == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    assert r["text_to_image"] == {1: 0.0, 2: 1.0}
    with pytest.raises(PromptError):
        recall_at_k(np.zeros((2, 3)))


def test_eval_retrieval_cli(tmp_path, clip_bundle, studies, retriever):
    (tmp_path / "texts").mkdir()
    items = []
    for i in range(5):
        (tmp_path / "texts" / f"r{i}.txt").write_text(TEXTS[i])
        items.append({"image": str(studies / f"s{i}.npy"), "text": f"texts/r{i}.txt"})
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"test": items, "train": items[:2]}))
    res = runner.invoke(app, ["eval-retrieval", str(clip_bundle), str(pairs), "--json"])
    assert res.exit_code == 2 and "--split" in res.output
    res = runner.invoke(app, ["eval-retrieval", str(clip_bundle), str(pairs), "--split", "test", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    img = np.stack([retriever.embed_image(studies / f"s{i}.npy") for i in range(5)])
    want = recall_at_k(img @ retriever.embed_texts(TEXTS).T)
    assert got["pairs"] == 5 and got["bundle_id"] == retriever.bundle_id
    for d in ("image_to_text", "text_to_image"):
        assert {int(k): v for k, v in got[d].items()} == want[d]
        assert got[d]["5"] == 1.0  # five pairs: every true pair is within the top 5
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{studies / f's{i}.npy'}\t{TEXTS[i]}\n" for i in range(3)))
    res = runner.invoke(app, ["eval-retrieval", str(clip_bundle), str(tsv)])
    assert res.exit_code == 0 and "image to text" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.npy"}\n')
    res = runner.invoke(app, ["eval-retrieval", str(clip_bundle), str(bad)])
    assert res.exit_code == 2 and "pair 1 needs" in res.output


def test_tiny_checkpoint_family_clip_exports(tmp_path):
    res = runner.invoke(app, ["tiny-checkpoint", str(tmp_path / "c"), "--family", "clip"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model_type"] == "m3d_clip"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    res = runner.invoke(app, ["tiny-checkpoint", str(tmp_path / "w"), "--family", "clip", "--preset", "wide"])
    assert res.exit_code == 2 and "presets tiny, bench" in res.output


def test_retrieval_runtime_imports_neither_torch_nor_transformers(clip_bundle, studies):
    code = textwrap.dedent(
        f"""
        import sys
        from m3d_edge.runtime.retrieval import Retriever
        from m3d_edge.runtime.retrieval_index import StudyIndex
        r = Retriever.open({str(clip_bundle)!r})
        assert r.embed_image({str(studies / "s0.npy")!r}).shape == (64,)
        assert r.embed_texts(["liver", "lung"]).shape == (2, 64)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print("LEAKED", bad)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LEAKED []" in out.stdout


def test_build_faiss_index_kinds():
    vecs = _unit(300, 8)
    ids = np.arange(100, 400)
    exact = build_faiss_index(vecs, ids, approximate=False)
    ivf = build_faiss_index(vecs, ids, approximate=True, nlist=16)
    ivf.nprobe = 16
    for index in (exact, ivf):
        _, got = index.search(vecs[:3], 1)
        assert got[:, 0].tolist() == [100, 101, 102]
