"""Serving overhead and throughput of ``m3d-edge serve`` vs a direct ``Pipeline.ask`` (issue 15).

    python benchmarks/serve_bench.py --bundle TINY_BUNDLE [--bundle BENCH_BUNDLE] [--requests 32]

For each bundle: ``vqa`` with 64 new greedy tokens on the synthetic CT-like volume, 2 threads.

- direct: ``Pipeline.ask`` in a fresh process, with study-cache hits (the same study each time) and without
  (the cache emptied before each question, so the vision encoder runs every time); median and p99.
- served: the server in its own process (uvicorn on 127.0.0.1), 1, 4 and 16 concurrent httpx clients,
  ``--requests`` questions per setting; "hits": every request on one study; "misses": ``--cache-mb 0``
  and requests spread round-robin over 4 studies, so consecutive questions alternate studies. Requests/s,
  p50/p99 latency, the cache hit rate read from /metrics, and the overhead per request: client latency
  minus the pipeline's own ``timings.total`` reported in the result (HTTP, JSON, queue hand-off).

Results: benchmarks/results/serve_bench.json (with the CPU named and the machine's load during each run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Noise, save, wait_for_quiet

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is the abnormality in the right lung and how large is it? Describe its location."
NEW_TOKENS = 64
KEY = "serve-bench-key-0123456789abcdef"
N_STUDIES = 4


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def stats(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p99": pct(values, 99), "n": len(values)}


def write_studies(folder: Path) -> list[Path]:
    from m3d_edge.runtime.imaging import phantom

    paths = []
    for i in range(N_STUDIES):
        p = folder / f"study{i}.npy"
        np.save(p, phantom.ct_like_volume(i)[None])
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------ direct


def direct(bundle: Path, studies: list[Path], runs: int, threads: int) -> dict:
    from m3d_edge.runtime.backend import BackendOptions
    from m3d_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.open(bundle, BackendOptions(threads=threads))
    ask = {"task": "vqa", "question": QUESTION, "max_new_tokens": NEW_TOKENS}
    pipe.ask(studies[0], **ask)  # warm-up
    out = {}
    for mode in ("hits", "misses"):
        lat, tokens = [], []
        for _ in range(runs):
            if mode == "misses":
                pipe.state = None  # forget every study: vision runs again
            t0 = time.perf_counter()
            r = pipe.ask(studies[0], **ask)
            lat.append(time.perf_counter() - t0)
            tokens.append(len(r.tokens))
        out[mode] = {"latency_s": stats(lat), "tokens_mean": statistics.mean(tokens)}
    return out


# ------------------------------------------------------------------------------------------ served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, folder: Path, cache_mb: float, threads: int):
    import httpx

    port = free_port()
    env = dict(
        os.environ, M3D_EDGE_API_KEYS=KEY, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    cmd = [sys.executable, "-m", "m3d_edge.cli.app", "serve", str(bundle), "--port", str(port)]
    cmd += ["--max-queue", "64", "--cache-mb", str(cache_mb), "--threads", str(threads), "--timeout", "3600"]
    log = open(folder / f"server-{port}.log", "wb")  # noqa: SIM115 (the server writes to it until stopped)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(folder / f'server-{port}.log').read_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError("server not ready")


def metric(client, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def served(url: str, ids: list[str], clients: int, requests: int) -> dict:
    """``requests`` questions from ``clients`` threads; round-robin over ``ids``."""
    import httpx

    lat, overhead, errors = [], [], []
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=3600) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"task": "vqa", "question": QUESTION, "max_new_tokens": NEW_TOKENS}
                t0 = time.perf_counter()
                r = c.post(f"/v1/studies/{ids[i % len(ids)]}/ask", json=body)
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(r.status_code)
                    continue
                lat.append(dt)
                overhead.append(dt - r.json()["timings"]["total"])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": requests,
        "errors": errors,
        "requests_per_s": len(lat) / wall,
        "latency_s": stats(lat),
        "overhead_ms": {k: v * 1000 if k != "n" else v for k, v in stats(overhead).items()},
    }


def bench_served(
    bundle: Path, studies: list[Path], mode: str, requests: int, threads: int, folder: Path
) -> dict:
    import httpx

    proc, url = start_server(bundle, folder, 2048 if mode == "hits" else 0, threads)
    try:
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
        ids = [c.post("/v1/studies", content=p.read_bytes()).json()["study_id"] for p in studies]
        ids = ids[:1] if mode == "hits" else ids
        served(url, ids, 1, 1)  # warm-up
        runs = {}
        for clients in (1, 4, 16):
            h0, m0 = metric(c, "m3d_study_cache_hits_total"), metric(c, "m3d_study_cache_misses_total")
            load = wait_for_quiet(0.3, timeout=60)
            with Noise() as noise:
                res = served(url, ids, clients, max(requests, clients))
            h, m = (
                metric(c, "m3d_study_cache_hits_total") - h0,
                metric(c, "m3d_study_cache_misses_total") - m0,
            )
            res["cache_hit_rate"] = h / max(1, h + m)
            res["machine_load_before"], res["machine_load_during"] = round(load, 2), round(noise.load, 2)
            runs[str(clients)] = res
            print(f"  {mode} {clients:>2} clients: {res['requests_per_s']:.2f} req/s, p50 "
                  f"{res['latency_s']['p50'] * 1000:.0f} ms, p99 {res['latency_s']['p99'] * 1000:.0f} ms, "
                  f"overhead p50 {res['overhead_ms']['p50']:.1f} ms, hit rate {res['cache_hit_rate']:.2f}", flush=True)  # fmt: skip
        return runs
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, action="append", required=True, help="repeat for several bundles")
    ap.add_argument("--name", action="append", help="a name per bundle (default: the folder name)")
    ap.add_argument("--requests", type=int, action="append", help="questions per served setting (per bundle)")
    ap.add_argument("--direct-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child-direct", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--studies", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_direct:
        studies = sorted(args.studies.glob("study*.npy"))
        print("RESULT " + json.dumps(direct(args.bundle[0], studies, args.direct_runs, args.threads)))
        return
    names = args.name or [b.name for b in args.bundle]
    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    studies = write_studies(folder)
    results = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "protocol": f"vqa, {NEW_TOKENS} new greedy tokens, batch 1, {args.threads} threads, CT-like phantom; "
        "served over HTTP/1.1 on 127.0.0.1 by uvicorn, httpx clients in threads",
        "bundles": {},
    }
    counts = args.requests or [32]
    counts = counts * len(args.bundle) if len(counts) == 1 else counts
    for bundle, name, requests in zip(args.bundle, names, counts, strict=True):
        print(f"{name}: direct", flush=True)
        load = wait_for_quiet(0.3, timeout=60)
        cmd = [sys.executable, __file__, "--bundle", str(bundle), "--child-direct", "--studies", str(folder)]
        cmd += ["--direct-runs", str(args.direct_runs), "--threads", str(args.threads)]
        with Noise() as noise:
            out = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO))
            )
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        d = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])
        d["machine_load_before"], d["machine_load_during"] = round(load, 2), round(noise.load, 2)
        print(f"  direct: hits p50 {d['hits']['latency_s']['p50'] * 1000:.0f} ms, "
              f"misses p50 {d['misses']['latency_s']['p50'] * 1000:.0f} ms", flush=True)  # fmt: skip
        entry = {"bundle": str(bundle), "requests_per_setting": requests, "direct": d, "served": {}}
        for mode in ("hits", "misses"):
            entry["served"][mode] = bench_served(bundle, studies, mode, requests, args.threads, folder)
        for mode in ("hits", "misses"):
            one = entry["served"][mode]["1"]["latency_s"]["p50"]
            base = d[mode]["latency_s"]["p50"]
            entry.setdefault("overhead_1_client", {})[mode] = {
                "served_p50_s": one,
                "direct_p50_s": base,
                "ratio": one / base,
                "extra_ms": (one - base) * 1000,
            }
        results["bundles"][name] = entry
        print(json.dumps(entry["overhead_1_client"], indent=2), flush=True)
    print("saved", save("serve_bench", results))


if __name__ == "__main__":
    main()
