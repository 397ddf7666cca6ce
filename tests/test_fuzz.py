"""A short slice of the fuzz harness (benchmarks/fuzz.py): every case ends typed, bounded and confined.

The full run (>= 10,000 cases) is ``python benchmarks/fuzz.py --cases 2000``; this one runs 60 cases per
target, each derived from (target, index), so a failure here names a case the full run reproduces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target", ["dicom", "nifti", "npy", "manifest", "checkpoint"])
def test_fuzz_slice(target, tmp_path):
    out = tmp_path / "fuzz.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--cases", "60", "--targets", target, "--json", str(out)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    res = doc["targets"][target]
    assert res["cases"] == 60, r.stdout + r.stderr
    assert res["findings"] == [], json.dumps(res["findings"][:5], indent=1)
    assert res["ok"] + sum(res["typed"].values()) == 60
    assert r.returncode == 0


def test_harness_catches_an_untyped_error(tmp_path):
    """The harness can fail: a reader that leaks a library exception is reported as a finding."""
    script = tmp_path / "leaky.py"
    script.write_text(
        "import sys; sys.path.insert(0, sys.argv[1]); import fuzz\n"
        "class Leaky(fuzz.Base):\n"
        "    def run(self, case_dir, rng):\n"
        "        open(case_dir.parent / 'outside' / 'secret', 'rb').close()\n"
        "        raise KeyError('library text')\n"
        "fuzz.CLASSES['npy'] = Leaky\n"
        "fuzz.worker('npy', 0, 2)\n"
    )
    r = subprocess.run(
        [sys.executable, str(script), str(ROOT / "benchmarks")],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120,
    )  # fmt: skip
    recs = [json.loads(line) for line in r.stdout.splitlines() if '"index"' in line]
    assert len(recs) == 2 and all(rec["outcome"] == "finding" for rec in recs), r.stdout + r.stderr
    assert "opened outside the case" in recs[0]["problem"]
