"""A newcomer's first ten minutes: docs in the repository, the extra named, two commands to start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from test_cli import invoke

ROOT = Path(__file__).resolve().parents[1]

BLOCK_EXPORT = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnx"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Absent())
from m3d_edge.cli.app import main
sys.argv = ["m3d-edge", *sys.argv[1:]]
main()
"""


def test_demo_without_the_export_extra_names_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", BLOCK_EXPORT, "demo", "--out", str(tmp_path / "d")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 6, r.stderr
    assert len(lines) == 1 and "needs the [export] extra" in lines[0], r.stderr
    assert "download.pytorch.org/whl/cpu" in lines[0] and "unexpected" not in lines[0]


def test_help_names_the_extra_and_points_to_the_architecture_doc():
    r = invoke("demo", "--help")
    assert "Needs the [export] extra" in r.stdout and "Needs the  extra" not in r.stdout
    for cmd in ("bench", "calibrate"):
        r = invoke(cmd, "--help")
        assert "docs/architecture.md" in r.stdout and "DESIGN" not in r.stdout
        section = re.search(r'docs/architecture\.md, section (\d+) "([^"]+)', " ".join(r.stdout.split()))
        doc = (ROOT / "docs" / "architecture.md").read_text()
        assert section and f"## {section.group(1)}. {section.group(2)}" in doc


def test_readme_links_what_exists_and_gives_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "shared folder" not in readme and "team's" not in readme
    assert "docs/architecture.md" in readme and (ROOT / "docs" / "architecture.md").is_file()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "make demo" in readme and "make test" in readme
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)
    assert "python -m pytest -q" in readme and "$(PYTHON) -m pytest -q" in make
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "pip install --quiet torch==2.13.0" in ci and "ruff check" in ci
