"""Fuzz the readers an attacker or a broken scanner can reach: DICOM, NIfTI, .npy, bundles, checkpoints.

    python benchmarks/fuzz.py --cases 2000            # 2000 per target (5 targets), writes results/fuzz.json
    python benchmarks/fuzz.py --cases 60 --json /tmp/f.json --targets npy,manifest

Each case is derived from ``(target, index)`` with a seeded RNG (rerun one with ``--only TARGET:INDEX``).
Cases run in worker processes under ``RLIMIT_AS`` (the memory bound) and an alarm (the time bound), with
an audit hook on ``open``: a case passes when it ends in success or in an error of our hierarchy of the
target's class (StudyError for images, BundleError for bundles, ExportError for checkpoints) with no
traceback in the message, opens no file outside its case folder (a sentinel file sits next to it, and
mutations aim paths at it), and runs no pickled code (a marker file must not appear).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("dicom", "nifti", "npy", "manifest", "checkpoint")
EXPECTED = {
    "dicom": "StudyError",
    "nifti": "StudyError",
    "npy": "StudyError",
    "manifest": "BundleError",
    "checkpoint": "ExportError",
}
MEMORY_LIMIT = 3 << 30  # bytes of address space per worker
CASE_SECONDS = 60
CHUNK = 250

NASTY = [
    None, True, False, 0, -1, 1, 2, 7, 65535, 65536, 2**31, 2**63, -(2**63), 1e308, -1e-308, 0.5,
    "", "0", "1", "-1", "nan", "inf", "1e999", "../outside/secret", "../../outside/secret",
    "/OUTSIDE/secret", "link", "x\x00y", "a" * 300, "é", "\\..\\secret", ".", "..", "sub/../../outside/secret",
    [], [1], [1, 2, 3], [0, 0, 0, 0, 0, 0], ["a", "b"], {}, {"a": 1}, {"file": "../outside/secret"},
]  # fmt: skip


# ------------------------------------------------------------------------------------------ helpers


def nasty(rng: random.Random, outside: Path) -> object:
    v = rng.choice(NASTY)
    if isinstance(v, str) and "OUTSIDE" in v:
        return str(outside / "secret")
    if isinstance(v, dict | list):
        return json.loads(json.dumps(v))
    return v


def mutate_bytes(data: bytes, rng: random.Random, limit: int | None = None) -> bytes:
    """1-8 flips, overwrites, truncations or insertions, biased to the first ``limit`` bytes (headers)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not b:
            b += bytes([rng.randrange(256)])
            continue
        span = min(len(b), limit or len(b))
        i = rng.randrange(span)
        op = rng.randrange(5)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op == 2:
            del b[rng.randrange(len(b)) :]
        elif op == 3:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            w = rng.choice([2, 4, 8])
            b[i : i + w] = rng.choice([b"\xff" * w, b"\x7f" + b"\xff" * (w - 1), b"\x00" * w])
    return bytes(b)


def mutate_json(obj: object, rng: random.Random, outside: Path) -> object:
    """Set, delete or retype 1-4 random nodes of a JSON tree."""
    obj = json.loads(json.dumps(obj))
    for _ in range(rng.randint(1, 4)):
        path: list[tuple[object, object]] = []
        node = obj
        while isinstance(node, dict | list) and node and rng.random() < 0.8:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append((node, key))
            node = node[key]
        if not path:
            continue
        parent, key = path[-1]
        op = rng.randrange(4)
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(parent, dict):
            parent[rng.choice(["file", "sha256", "extra", "../x"])] = nasty(rng, outside)
        else:
            parent[key] = nasty(rng, outside)
    return obj


# ------------------------------------------------------------------------------------------ targets


class Base:
    """Builds the pristine inputs once per worker; ``case()`` writes a mutated copy and reads it."""

    def __init__(self, work: Path) -> None:
        self.work = work

    def run(self, case_dir: Path, rng: random.Random) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class Dicom(Base):
    def __init__(self, work: Path) -> None:
        super().__init__(work)
        from m3d_edge.runtime.imaging.phantom import write_phantom_series

        src = write_phantom_series(work / "dicom_base", slices=6, rows=16, cols=16, seed=0)
        self.files = {p.name: p.read_bytes() for p in sorted(src.iterdir())}

    ATTRS: ClassVar[list] = [
        "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
        "NumberOfFrames", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
        "RescaleSlope", "RescaleIntercept", "PhotometricInterpretation", "SeriesInstanceUID", "Modality",
        "SOPClassUID", "ImageType", "PixelData", "PlanarConfiguration", "InstanceNumber",
    ]  # fmt: skip

    def run(self, case_dir: Path, rng: random.Random) -> None:
        import pydicom

        from m3d_edge.runtime.imaging import load_study, preprocess

        study = case_dir / "study"
        study.mkdir()
        for name, data in self.files.items():
            (study / name).write_bytes(data)
        names = sorted(self.files)
        for _ in range(rng.randint(1, 3)):
            victim = study / rng.choice(names)
            if not victim.exists():
                continue
            kind = rng.randrange(4)
            if kind == 0:
                victim.write_bytes(mutate_bytes(victim.read_bytes(), rng, limit=1200))
            elif kind == 1:
                try:
                    ds = pydicom.dcmread(victim)
                    attr = rng.choice(self.ATTRS)
                    if attr == "PixelData":
                        ds.PixelData = mutate_bytes(ds.PixelData, rng)
                    elif rng.random() < 0.2:
                        delattr(ds, attr) if attr in ds else None
                    else:
                        setattr(ds, attr, self._value(rng, case_dir))
                    if rng.random() < 0.2:
                        ds.file_meta.TransferSyntaxUID = rng.choice(
                            ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.2", "1.2.3"]
                        )
                    ds.save_as(victim, enforce_file_format=False)
                except Exception:  # the mutation itself was invalid for pydicom: flip bytes instead
                    victim.write_bytes(mutate_bytes(victim.read_bytes(), rng, limit=1200))
            elif kind == 2:
                victim.unlink()
            else:
                (study / "link.dcm").unlink(missing_ok=True)
                (study / "link.dcm").symlink_to(case_dir.parent / "outside" / "secret")
        s = load_study(study)
        preprocess(s)

    @staticmethod
    def _value(rng: random.Random, case_dir: Path) -> object:
        return rng.choice(
            [0, 1, 3, 8, 12, 17, 32, 64, 65535, -1, 2**16, "X", "", [0, 0], [1, 0, 0, 0, 1, 0], [1e9, 0, 0],
             ["nan", "1", "1"], "1e308", "-0", "MONOCHROME1", "RGB", "PALETTE COLOR", 4096, 1_000_000]
        )  # fmt: skip


class Nifti(Base):
    FIELDS: ClassVar[list] = [  # (offset, struct format) in the NIfTI-1 header
        (0, "<i"), (40, "<h"), (42, "<h"), (44, "<h"), (46, "<h"), (48, "<h"), (70, "<h"), (72, "<h"),
        (76, "<f"), (80, "<f"), (84, "<f"), (88, "<f"), (108, "<f"), (112, "<f"), (116, "<f"),
        (252, "<h"), (254, "<h"), (256, "<f"), (260, "<f"), (264, "<f"), (268, "<f"), (280, "<f"),
        (284, "<f"), (296, "<f"), (312, "<f"), (344, "4s"),
    ]  # fmt: skip

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        import nibabel as nib
        import numpy as np

        vol = (np.arange(8 * 12 * 10, dtype=np.int16).reshape(10, 12, 8) % 300) - 100
        img = nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0]))
        img.to_filename(str(work / "base.nii"))
        self.data = (work / "base.nii").read_bytes()

    def run(self, case_dir: Path, rng: random.Random) -> None:
        import gzip

        from m3d_edge.runtime.imaging import load_study, preprocess

        b = bytearray(self.data)
        if rng.random() < 0.7:
            for _ in range(rng.randint(1, 4)):
                off, fmt = rng.choice(self.FIELDS)
                if fmt == "4s":
                    val = rng.choice([b"n+1\0", b"ni1\0", b"xxxx", b"n+2\0"])
                elif fmt == "<h":
                    val = rng.choice([0, 1, -1, 2, 3, 4, 7, 8, 16, 32767, -32768, 64, 128, 512, 1536, 2304])
                elif fmt == "<i":
                    val = rng.choice([348, 540, 0, -1, 2**31 - 1])
                else:
                    val = rng.choice(
                        [0.0, -1.0, 1.0, 1e30, -1e30, float("nan"), float("inf"), 352.0, 1e9, 3.0]
                    )
                struct.pack_into(fmt, b, off, val)
        else:
            b = bytearray(mutate_bytes(bytes(b), rng, limit=352))
        gz = rng.random() < 0.3
        path = case_dir / ("v.nii.gz" if gz else "v.nii")
        path.write_bytes(gzip.compress(bytes(b)) if gz else bytes(b))
        preprocess(load_study(path))


class Npy(Base):
    DESCRS: ClassVar[list] = [
        "<f4",
        "<f8",
        "<i2",
        "|u1",
        "|b1",
        ">f4",
        "|O",
        "V8",
        "<U4",
        "<c8",
        "<M8[s]",
        "zz",
        "<f2",
    ]
    SHAPES: ClassVar[list] = [
        (1, 32, 256, 256), (32, 256, 256), (), (0,), (32, 256, 0), (2**40, 2**40), (-1,), (1, 32, 256, 256, 1),
        (2**31, 1, 1), (32, 256, 255),
    ]  # fmt: skip

    def run(self, case_dir: Path, rng: random.Random) -> None:
        import numpy as np

        from m3d_edge.runtime.imaging import load_study, preprocess

        if rng.random() < 0.6:
            descr = "<f4" if rng.random() < 0.4 else rng.choice(self.DESCRS)
            shape = (1, 32, 256, 256) if rng.random() < 0.4 else rng.choice(self.SHAPES)
            header = repr({"descr": descr, "fortran_order": rng.random() < 0.2, "shape": shape})
            if rng.random() < 0.2:
                header = mutate_bytes(header.encode(), rng).decode("latin-1")
            header = header.encode("latin-1") + b" " * (rng.randint(0, 40)) + b"\n"
            body = np.full(rng.choice([0, 16, 32 * 256 * 256, 32 * 256 * 256]), 0.5, np.float32).tobytes()
            if rng.random() < 0.3:
                body = body[: rng.randrange(len(body) + 1)]
            version = rng.choice([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x00"])
            length = struct.pack("<H" if version == b"\x01\x00" else "<I", len(header))
            data = b"\x93NUMPY" + version + length + header + body
        else:
            buf = io.BytesIO()
            np.save(buf, np.full((32, 256, 256), 0.25, np.float32))
            data = mutate_bytes(buf.getvalue(), rng, limit=128)
        path = case_dir / "v.npy"
        path.write_bytes(data)
        preprocess(load_study(path))


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(field: int, payload: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(payload)) + payload


def onnx_with_external(location: str) -> bytes:
    """A ModelProto whose one initializer keeps its data in ``location`` (wire format by hand)."""
    entry = _pb(1, b"location") + _pb(2, location.encode("utf-8", "surrogatepass"))
    tensor = _pb(8, b"w") + _pb(13, entry) + _pb_varint(14 << 3) + b"\x01"
    graph = _pb(5, tensor)
    return _pb_varint(1 << 3) + b"\x07" + _pb(7, graph)


class Manifest(Base):
    def __init__(self, work: Path) -> None:
        super().__init__(work)
        import numpy as np
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        from m3d_edge.bundle import GraphEntry, Manifest, ModelDims, graph_specs, io_declaration, sha256_file

        dims = ModelDims(
            family="phi3", hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, vocab_size=16,
            max_position_embeddings=64, sliding_window=None, image_size=(32, 256, 256), patch_size=(4, 16, 16),
            vision_hidden=8, seg_hidden=8, num_image_tokens=256,
        )  # fmt: skip
        base = work / "bundle_base"
        base.mkdir()
        np.save(base / "embed.npy", np.zeros((16, 8), np.float32))
        Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(base / "tokenizer.json"))
        graphs = {}
        for name, spec in graph_specs(dims).items():
            (base / spec.file).write_bytes(b"\x08\x07")  # a ModelProto holding only ir_version 7
            graphs[name] = GraphEntry(
                file=spec.file,
                sha256={spec.file: sha256_file(base / spec.file)},
                inputs=io_declaration(spec.inputs),
                outputs=io_declaration(spec.outputs),
            )
        self.manifest = Manifest(
            bundle_id="fuzz", producer="fuzz", dims=dims, token_ids={"seg": 3, "eos": [2]}, prompt={},
            preprocessing={}, generation={"max_new_tokens": 4}, graphs=graphs,
            embed={"file": "embed.npy", "sha256": sha256_file(base / "embed.npy"), "shape": [16, 8]},
            tokenizer={"file": "tokenizer.json", "sha256": sha256_file(base / "tokenizer.json")},
        )  # fmt: skip
        self.base = base

    def run(self, case_dir: Path, rng: random.Random) -> None:
        from m3d_edge.bundle import MANIFEST, read_manifest, sha256_file
        from m3d_edge.runtime.pipeline import load_embed_table, load_tokenizer

        bundle = case_dir / "bundle"
        shutil.copytree(self.base, bundle)
        raw = json.loads(self.manifest.to_json())
        kind = rng.randrange(5)
        outside = case_dir.parent / "outside"
        if kind == 0:  # the manifest's JSON
            raw = mutate_json(raw, rng, outside)
        elif kind in (1, 2):  # a file's bytes, with its hash updated so the reader is reached
            rel = rng.choice(["embed.npy", "tokenizer.json", "vision.onnx", "decoder.onnx"])
            data = (bundle / rel).read_bytes()
            if rel.endswith(".onnx") and kind == 2:
                loc = rng.choice(
                    ["../outside/secret", str(outside / "secret"), "data.bin", "", "sub/../../x"]
                )
                data = onnx_with_external(loc)
                if loc == "data.bin" and rng.random() < 0.5:
                    (bundle / "data.bin").write_bytes(b"\0" * 16)
            else:
                data = mutate_bytes(data, rng, limit=256)
            (bundle / rel).write_bytes(data)
            digest = sha256_file(bundle / rel)
            if rel == "embed.npy":
                raw["embed"]["sha256"] = digest
            elif rel == "tokenizer.json":
                raw["tokenizer"]["sha256"] = digest
            else:
                raw["graphs"][rel[:-5]]["sha256"] = {rel: digest}
        elif kind == 3:  # a symlink out of the bundle, hash of the outside file given
            rel = rng.choice(["embed.npy", "vision.onnx", "tokenizer.json"])
            (bundle / rel).unlink()
            (bundle / rel).symlink_to(outside / "secret")
        else:  # raw bytes of manifest.json
            text = mutate_bytes(json.dumps(raw).encode(), rng)
            (bundle / MANIFEST).write_bytes(text)
            raw = None
        if raw is not None:
            (bundle / MANIFEST).write_text(json.dumps(raw))
        m = read_manifest(bundle, verify=True)
        load_embed_table(bundle / m.embed["file"])
        load_tokenizer(bundle / m.tokenizer["file"])


class Checkpoint(Base):
    def __init__(self, work: Path) -> None:
        super().__init__(work)
        import torch
        from safetensors.torch import save_file

        base = work / "ckpt_base"
        base.mkdir()
        save_file({"a.weight": torch.zeros(4, 4)}, str(base / "model-00001-of-00002.safetensors"))
        save_file({"b.weight": torch.ones(2)}, str(base / "model-00002-of-00002.safetensors"))
        self.index = {
            "metadata": {"total_size": 72},
            "weight_map": {
                "a.weight": "model-00001-of-00002.safetensors",
                "b.weight": "model-00002-of-00002.safetensors",
            },
        }
        (base / "model.safetensors.index.json").write_text(json.dumps(self.index))
        self.base = base

    def run(self, case_dir: Path, rng: random.Random) -> None:
        import pickle

        from m3d_edge.export.checkpoint import INDEX, load_state_dict

        ckpt = case_dir / "ckpt"
        shutil.copytree(self.base, ckpt)
        outside = case_dir.parent / "outside"
        index = self.index
        kind = rng.randrange(5)
        if kind == 0:
            index = mutate_json(index, rng, outside)
        elif kind == 1:  # a shard's bytes (safetensors header first)
            shard = ckpt / rng.choice(sorted(set(self.index["weight_map"].values())))
            shard.write_bytes(mutate_bytes(shard.read_bytes(), rng, limit=128))
        elif kind == 2:  # a pickled shard that would run code
            with open(ckpt / "evil.bin", "wb") as f:
                pickle.dump({"a.weight": _Marker(str(case_dir / "MARKER"))}, f)
            index = json.loads(json.dumps(index))
            index["weight_map"]["a.weight"] = "evil.bin"
        elif kind == 3:
            index = json.loads(json.dumps(index))
            (ckpt / "link.safetensors").symlink_to(outside / "secret")
            index["weight_map"]["b.weight"] = rng.choice(
                ["link.safetensors", "../outside/secret", str(outside / "secret"), "sub/../../outside/secret"]
            )
        else:
            (ckpt / INDEX).write_bytes(mutate_bytes(json.dumps(index).encode(), rng))
            index = None
        if index is not None:
            (ckpt / INDEX).write_text(json.dumps(index))
        load_state_dict(ckpt, allow_pickle=rng.random() < 0.5)


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


CLASSES = {"dicom": Dicom, "nifti": Nifti, "npy": Npy, "manifest": Manifest, "checkpoint": Checkpoint}


# ------------------------------------------------------------------------------------------ worker


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout


def worker(target: str, start: int, count: int) -> None:
    """Run cases ``start .. start+count`` of ``target``; one JSON line per case on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    from m3d_edge.errors import M3DEdgeError

    tmp = Path(tempfile.mkdtemp(prefix=f"m3d-fuzz-{target}-"))
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"\x93NUMPY secret " * 64)
    gen = CLASSES[target](tmp)
    allowed: list[str] = []
    opened: list[str] = []
    watching = [False]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    signal.signal(signal.SIGALRM, _alarm)
    out = sys.stdout
    for i in range(start, start + count):
        rng = random.Random(f"{target}:{i}")
        case_dir = tmp / f"case{i}"
        case_dir.mkdir()
        allowed = [str(case_dir.resolve())]
        opened.clear()
        rec: dict[str, object] = {"target": target, "index": i}
        t0 = time.perf_counter()
        signal.alarm(CASE_SECONDS)
        try:
            watching[0] = True
            gen.run(case_dir, rng)
            rec["outcome"] = "ok"
        except _Timeout:
            rec.update(outcome="finding", problem=f"no result within {CASE_SECONDS} s")
        except M3DEdgeError as e:
            rec.update(outcome="typed", type=type(e).__name__, exit_code=e.exit_code, message=str(e)[:300])
            if type(e).__name__ != EXPECTED[target] and not isinstance(e, _expected_class(target)):
                rec.update(outcome="finding", problem=f"wrong error class {type(e).__name__}")
            elif "Traceback" in str(e):
                rec.update(outcome="finding", problem="traceback text in the message")
        except BaseException as e:
            rec.update(outcome="finding", problem=f"untyped {type(e).__name__}", message=str(e)[:300])
        finally:
            signal.alarm(0)
            watching[0] = False
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        outside_reads = sorted(
            {p for p in opened if not _inside(p, allowed) and not _system(p) and "outside" in p}
        )
        if outside_reads:
            rec.update(outcome="finding", problem=f"opened outside the case: {outside_reads[:3]}")
        if (case_dir / "MARKER").exists():
            rec.update(outcome="finding", problem="pickled code ran")
        out.write(json.dumps(rec) + "\n")
        out.flush()
        shutil.rmtree(case_dir, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.write(json.dumps({"worker_peak_rss_kb": rss}) + "\n")


def _expected_class(target: str) -> type:
    from m3d_edge import errors

    return getattr(errors, EXPECTED[target])


def _inside(path: str, roots: list[str]) -> bool:
    p = os.path.realpath(path)
    return any(p == r or p.startswith(r + os.sep) for r in roots)


def _system(path: str) -> bool:
    """Libraries, interpreter and /proc files that imports open (not what a case could steer)."""
    p = os.path.realpath(path)
    prefixes = {sys.prefix, sys.base_prefix, "/usr", "/proc", "/sys", "/etc", "/dev", str(ROOT)}
    return any(p.startswith(x + os.sep) for x in prefixes)


# ------------------------------------------------------------------------------------------ driver


def run_target(target: str, cases: int, only: int | None = None) -> dict[str, object]:
    """Run ``cases`` cases of ``target`` in worker chunks; a crashed worker is a finding and is resumed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    counts = {"cases": 0, "ok": 0, "typed": {}, "findings": []}
    seconds = 0.0
    peak = 0
    i = only if only is not None else 0
    end = (only + 1) if only is not None else cases
    while i < end:
        n = min(CHUNK, end - i)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target, str(i), str(n)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        done = i
        for line in proc.stdout.splitlines():
            rec = json.loads(line)
            if "worker_peak_rss_kb" in rec:
                peak = max(peak, int(rec["worker_peak_rss_kb"]))
                continue
            done = int(rec["index"]) + 1
            counts["cases"] += 1
            seconds += float(rec["seconds"])
            if rec["outcome"] == "ok":
                counts["ok"] += 1
            elif rec["outcome"] == "typed":
                counts["typed"][rec["type"]] = counts["typed"].get(rec["type"], 0) + 1
            else:
                counts["findings"].append(rec)
        if proc.returncode != 0:  # the worker died on case `done` (segfault, abort, memory kill)
            tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
            counts["cases"] += 1
            counts["findings"].append(
                {"target": target, "index": done, "problem": f"worker died (rc {proc.returncode}) {tail}"}
            )
            done += 1
        i = max(done, i + 1)
    counts["case_seconds"] = round(seconds, 2)
    counts["worker_peak_rss_mb"] = round(peak / 1024, 1)
    return counts


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000, help="cases per target")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--json", type=Path, default=HERE / "results" / "fuzz.json")
    ap.add_argument("--only", help="TARGET:INDEX, rerun one case")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), int(a.worker[2]))
        return 0
    t0 = time.time()
    if a.only:
        target, idx = a.only.split(":")
        results = {target: run_target(target, 1, int(idx))}
    else:
        results = {t: run_target(t, a.cases) for t in a.targets.split(",")}
    total = sum(int(r["cases"]) for r in results.values())
    findings = sum(len(r["findings"]) for r in results.values())  # type: ignore[arg-type]
    doc = {
        "command": "python benchmarks/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_name(),
        "memory_limit_bytes": MEMORY_LIMIT,
        "case_timeout_s": CASE_SECONDS,
        "total_cases": total,
        "total_findings": findings,
        "wall_seconds": round(time.time() - t0, 1),
        "targets": results,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2) + "\n")
    for t, r in results.items():
        print(
            f"{t:11s} {r['cases']:6d} cases  ok {r['ok']:5d}  typed {r['typed']}  findings {len(r['findings'])}"
        )
    print(f"total {total} cases, {findings} findings -> {a.json}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
