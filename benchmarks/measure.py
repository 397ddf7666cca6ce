"""Run a command and measure its wall time and peak memory (the process tree's summed RSS, sampled from
/proc every 0.2 s, and the kernel's ru_maxrss of the largest child). Used by the full-size benchmarks.

    python benchmarks/measure.py --json out.json -- m3d-edge export ckpt -o bundle --precision int4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Summed resident memory of ``pid`` and its descendants (VmRSS; mapped shard pages count too)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        todo += _children(p)
    return total


def measure(cmd: list[str], interval: float = 0.2) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = proc.wait()
    thread.join()
    wall = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "command": " ".join(cmd),
        "returncode": rc,
        "wall_s": round(wall, 1),
        "peak_tree_rss_gb": round(peak[0] / 1e9, 3),
        "peak_maxrss_gb": round(maxrss / 1e9, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, help="append the measurement to this JSON list")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    res = measure(cmd)
    print(json.dumps(res), flush=True)
    if a.json:
        rows = json.loads(a.json.read_text()) if a.json.is_file() else []
        rows.append({**res, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return res["returncode"]


if __name__ == "__main__":
    sys.exit(main())
