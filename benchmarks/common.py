"""Helpers shared by the benchmark scripts: machine noise, medians, result files (docs/architecture.md §8)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from m3d_edge.cli.bench import peak_rss_bytes, percentiles

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Noise:
    """Fraction of the machine that was busy during a block (ours included)."""

    def __enter__(self) -> Noise:
        self.start = cpu_busy()
        return self

    def __exit__(self, *exc) -> None:
        busy, total = cpu_busy()
        self.load = (busy - self.start[0]) / max(1, total - self.start[1])


def wait_for_quiet(max_load: float = 0.25, timeout: float = 120.0, window: float = 2.0) -> float:
    """Wait until the machine's load over ``window`` seconds falls under ``max_load``; return the last load."""
    deadline = time.time() + timeout
    while True:
        with Noise() as n:
            time.sleep(window)
        if n.load <= max_load or time.time() > deadline:
            return n.load


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB (m3d_edge.cli.bench.peak_rss_bytes, the one measurement)."""
    return peak_rss_bytes() / 2**20


def summary(values: list[float]) -> dict[str, float]:
    """The results files' summary of samples: median, min, max, n (from m3d_edge.cli.bench.percentiles)."""
    p = percentiles(values)
    return {"median": p["p50"], "min": p["min"], "max": p["max"], "n": p["n"]}


def machine() -> dict[str, object]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
