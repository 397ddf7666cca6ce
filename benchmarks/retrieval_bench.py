"""M3D-CLIP retrieval benchmark: embedding throughput and index search latency/recall/memory.

    python benchmarks/retrieval_bench.py --work /tmp/retrbench            # both parts
    python benchmarks/retrieval_bench.py --work /tmp/retrbench --part search --sizes 10000,100000

Embedding: a bench-size M3D-CLIP (ViT-B + bert-base sizes, random weights, ``tiny-checkpoint --family
clip --preset bench``) exported to a retrieval bundle; studies/s of the FP32 image encoder at batch 1
and 2 on CT-like volumes, texts/s of the text encoder at batch 1 and 32 on report-length texts (about 60
tokens), 2 threads, one warm-up, median of ``--repeats`` runs.

Search: synthetic unit vectors, 768-d float32, drawn as a mixture of ``n / 100`` Gaussian clusters
(embeddings of real studies cluster by anatomy and protocol; uniformly random vectors have no neighbours
worth finding and are the worst case for any inverted file, so one unclustered row is reported too).
Exact: ``IndexIDMap2(IndexFlatIP)``. Approximate: ``IndexIVFFlat`` (inner product) with the index's own
``ivf_nlist`` lists, swept over ``nprobe``. One query at a time (what a user's search does; faiss on one thread per query, as
``StudyIndex.search`` runs it: fanning one query out over threads was 30x slower on the shared machine);
p50/p99 over ``--queries`` held-out queries (fewer for exact at 1M, it takes ~0.1 s each); recall@10 of
the approximate top 10 against the exact top 10; memory as the index's own bytes and the RSS growth.
Results: ``benchmarks/results/retrieval_bench.json``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Noise, machine, save, summary, wait_for_quiet

DIM = 768
QUIET_WAIT = 8.0  # seconds to wait for a quieter machine before each measurement (load is recorded)
REPORT = (
    "The liver is enlarged with a 3.2 cm hypodense lesion in segment 7, likely a cyst. No biliary dilatation. "
    "Spleen, pancreas and both kidneys are unremarkable. Small bilateral pleural effusions."
)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn, repeats: int) -> tuple[list[float], float]:
    fn()  # warm-up
    times = []
    with Noise() as noise:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times, noise.load


# -- embedding --------------------------------------------------------------------------------------
def bench_embedding(work: Path, repeats: int, threads: int) -> dict:
    from m3d_edge.export.exporter import export_bundle
    from m3d_edge.export.tiny_clip import write_tiny_clip_checkpoint
    from m3d_edge.runtime.backend import BackendOptions
    from m3d_edge.runtime.imaging.phantom import ct_like_volume
    from m3d_edge.runtime.retrieval import Retriever

    bundle = work / "bench_bundle"
    if not (bundle / "manifest.json").is_file():
        ckpt = write_tiny_clip_checkpoint(work / "bench_ckpt", preset="bench")
        t0 = time.perf_counter()
        export_bundle(ckpt, bundle, overwrite=True)
        print(f"exported the bench bundle in {time.perf_counter() - t0:.0f} s", flush=True)
    r = Retriever.open(bundle, BackendOptions(threads=threads))
    vols = np.stack([ct_like_volume(i)[None] for i in range(2)])
    out: dict = {"bundle": "bench (ViT-B 12x768 + BERT 12x768, random weights)", "threads": threads}
    for b in (1, 2):
        wait_for_quiet(0.3, timeout=QUIET_WAIT)
        times, load = timed(lambda b=b: r.embed_volumes(vols[:b]), repeats)
        med = summary(times)["median"]
        out[f"image_batch{b}"] = {"seconds": summary(times), "studies_per_s": b / med, "load": load}
        print(f"image batch {b}: {b / med:.3f} studies/s (load {load:.2f})", flush=True)
    ids, _ = r.tokenize([REPORT])
    texts = [REPORT] * 32
    for b in (1, 32):
        wait_for_quiet(0.3, timeout=QUIET_WAIT)
        times, load = timed(lambda b=b: r.embed_texts(texts[:b], batch_size=b), repeats)
        med = summary(times)["median"]
        out[f"text_batch{b}"] = {"seconds": summary(times), "texts_per_s": b / med, "load": load}
        print(f"text batch {b}: {b / med:.1f} texts/s (load {load:.2f})", flush=True)
    out["text_tokens"] = int(ids.shape[1])
    return out


# -- search -----------------------------------------------------------------------------------------
def chunks(n: int, clusters: int, seed: int, chunk: int = 100_000):
    """Deterministic unit vectors in chunks: cluster centre + noise (clusters=0: uniform on the sphere)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(clusters, 1), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        g = np.random.default_rng((seed, start))
        noise = g.standard_normal((m, DIM)).astype(np.float32)
        v = centres[g.integers(0, clusters, m)] + noise * (0.9 / np.sqrt(DIM)) if clusters else noise
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        yield start, v


def latencies(index, queries: np.ndarray, k: int = 10) -> tuple[dict, np.ndarray]:
    """One query at a time through the index's own search path (one OpenMP thread per query)."""
    from m3d_edge.runtime.retrieval_index import faiss_search

    index.search(queries[:5], k)  # warm-up
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = faiss_search(index, q[None], k)
        times.append((time.perf_counter() - t0) * 1000)
        found.append(ids[0])
    t = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(t, 50)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "queries": len(t),
    }, np.stack(found)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth, strict=True)]))


def bench_size(n: int, n_queries: int, nprobes: list[int], clustered: bool, seed: int = 0) -> dict:
    import faiss

    from m3d_edge.runtime.retrieval_index import build_faiss_index, ivf_nlist

    clusters = max(n // 100, 1) if clustered else 0
    label = f"{n} {'clustered' if clustered else 'uniform'}"
    # queries: fresh draws from the same distribution (other seed stream, same centres)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(clusters, 1), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    g = np.random.default_rng((seed, 10**12))
    noise = g.standard_normal((n_queries, DIM)).astype(np.float32)
    q = (
        centres[g.integers(0, max(clusters, 1), n_queries)] + noise * (0.9 / np.sqrt(DIM))
        if clusters
        else noise
    )
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    row: dict = {
        "vectors": n,
        "dim": DIM,
        "clusters": clusters,
        "data": "clustered" if clustered else "uniform",
    }
    # exact
    gc.collect()
    rss0 = rss_bytes()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    t0 = time.perf_counter()
    for start, v in chunks(n, clusters, seed):
        flat.add_with_ids(v, np.arange(start, start + len(v), dtype=np.int64))
    build = time.perf_counter() - t0
    _, truth = flat.search(q, 10)  # ground truth, batched
    n_exact = min(n_queries, 200 if n >= 1_000_000 else n_queries)
    wait_for_quiet(0.3, timeout=QUIET_WAIT)
    with Noise() as noise:
        lat, found = latencies(flat, q[:n_exact])
    row["exact"] = {
        **lat,
        "recall_at_10": recall_at_10(found, truth[:n_exact]),
        "index_bytes": n * DIM * 4 + n * 8,
        "rss_growth_bytes": rss_bytes() - rss0,
        "build_s": build,
        "load": noise.load,
    }
    print(f"{label}: exact p50 {lat['p50_ms']:.2f} ms p99 {lat['p99_ms']:.2f} ms", flush=True)
    del flat
    gc.collect()
    # approximate: IVF trained on a sample, vectors added in chunks
    nlist = ivf_nlist(n)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    sample_n = min(n, 40 * nlist)
    first = itertools.islice(chunks(n, clusters, seed), max(1, -(-sample_n // 100_000)))
    sample = np.concatenate([v for _, v in first])
    sample = sample[np.random.default_rng(1).choice(len(sample), min(sample_n, len(sample)), replace=False)]
    ivf = build_faiss_index(sample, np.arange(len(sample)), approximate=True, nlist=nlist)
    ivf.reset()  # keep the training, add the real ids below
    del sample
    for start, v in chunks(n, clusters, seed):
        ivf.add_with_ids(v, np.arange(start, start + len(v), dtype=np.int64))
    build = time.perf_counter() - t0
    row["approximate"] = {
        "index": "IndexIVFFlat",
        "nlist": nlist,
        "index_bytes": n * (DIM * 4 + 8) + nlist * DIM * 4,
        "rss_growth_bytes": rss_bytes() - rss0,
        "build_s": build,
        "nprobe": {},
    }
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        wait_for_quiet(0.3, timeout=QUIET_WAIT)
        with Noise() as noise:
            lat, found = latencies(ivf, q)
        rec = recall_at_10(found, truth)
        row["approximate"]["nprobe"][str(nprobe)] = {**lat, "recall_at_10": rec, "load": noise.load}
        print(
            f"{label}: ivf nlist {nlist} nprobe {nprobe}: p50 {lat['p50_ms']:.2f} p99 {lat['p99_ms']:.2f} ms recall@10 {rec:.3f}",
            flush=True,
        )
    del ivf
    gc.collect()
    return row


def bench_study_index(work: Path, n: int, n_queries: int) -> dict:
    """End to end through StudyIndex (faiss + SQLite metadata for the hits) at ``n`` vectors."""
    from m3d_edge.runtime.retrieval_index import Record, StudyIndex

    path = Path(tempfile.mkdtemp(dir=work, prefix="idx-"))
    idx = StudyIndex.create(path / "i", "bench", DIM)
    t0 = time.perf_counter()
    for start, v in chunks(n, n // 100, 0):
        recs = [Record(f"k{i}", f"h{i}", name=f"study{i}") for i in range(start, start + len(v))]
        idx.add(recs, v, sync=False)
    idx.sync()
    build = time.perf_counter() - t0
    qs = next(chunks(n_queries, n // 100, 1, chunk=n_queries))[1]
    idx.search(qs[0], 10)
    times = []
    for q in qs:
        t0 = time.perf_counter()
        idx.search(q, 10)
        times.append((time.perf_counter() - t0) * 1000)
    t = np.asarray(times)
    db_bytes = (path / "i" / "index.sqlite").stat().st_size
    idx.close()
    return {
        "vectors": n,
        "p50_ms": float(np.percentile(t, 50)),
        "p99_ms": float(np.percentile(t, 99)),
        "build_s": build,
        "sqlite_bytes": db_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retrieval_bench")
    ap.add_argument("--part", choices=["all", "embed", "search"], default="all")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="retrieval_bench")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    result: dict = {
        "benchmark": "retrieval_bench",
        "cpu": cpu_name(),
        "machine": machine(),
        "faiss": faiss.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "loadavg_start": os.getloadavg(),  # 1/5/15-minute load averages of the shared machine
    }
    prev = Path(__file__).resolve().parent / "results" / f"{args.out}.json"
    if prev.is_file() and args.part != "all":  # keep the other part's numbers
        import json

        old = json.loads(prev.read_text())
        result.update({k: v for k, v in old.items() if k in ("embedding", "search", "study_index")})
    if args.part in ("all", "embed"):
        result["embedding"] = bench_embedding(args.work, args.repeats, args.threads)
        save(args.out, result)
    if args.part in ("all", "search"):
        nprobes = [int(x) for x in args.nprobe.split(",")]
        rows = []
        for n in (int(x) for x in args.sizes.split(",")):
            rows.append(bench_size(n, args.queries, nprobes, clustered=True))
            result["search"] = rows
            save(args.out, result)
        rows.append(bench_size(100_000, args.queries, nprobes, clustered=False))
        result["search"] = rows
        result["study_index"] = bench_study_index(args.work, 10_000, 200)
        save(args.out, result)
    result["loadavg_end"] = os.getloadavg()
    save(args.out, result)
    print(f"wrote benchmarks/results/{args.out}.json")


if __name__ == "__main__":
    main()
