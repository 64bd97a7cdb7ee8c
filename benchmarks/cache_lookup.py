"""Tool-cache speed on a synthetic cache: exact lookup, nearest lookup, concurrent writes, env steps.

Builds a cache of ``--entries`` text-to-image entries (seeded calls with distinct prompts, sharing
256 small PNG files), then measures:

- exact: ``ToolCache.get`` on a precomputed key, and ``ExactCacheBackend.answer`` on a request
  (argument normalisation, key hashing, the SQLite lookup and the file check), hits and misses;
- nearest: synthetic clustered 384-d unit vectors stand in for MiniLM embeddings (stored in the
  cache's embedding table as if computed earlier); the index is built by the first
  ``NearestBackend.refresh`` (read every embedding, train and fill faiss, save the index next to
  the cache) and saved again by ``save_index`` (timed alone); ``NearestBackend.answer`` is timed
  with the query vector given (embedding excluded), with recall@1 of the index against exact
  search; MiniLM query embedding is timed separately on distinct prompts;
- cold start (``--cold-start``): a new process's first ``refresh`` and ``answer``, once with the
  saved index removed (every process paid this before the index was saved) and once loading the
  saved index;
- writes: entries per second stored by 1 and by ``--writers`` processes at once, one entry
  (one transaction, one new file) per ``put``;
- env: ``VisGenEnv.step`` time of one text-to-image call served by each tier.

    python benchmarks/cache_lookup.py [--entries 1000000] [--queries 10000] [--writers 4] [--cold-start]
                                      [--root DIR] [--out benchmarks/results/cache_lookup.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from visenv.tools.attribute import AttributeBackend
from visenv.tools.backends import MediaOutput, ToolRequest
from visenv.tools.cache import ExactCacheBackend, ToolCache
from visenv.tools.cache_key import CallKey
from visenv.tools.nearest import INDEX_DIR, MiniLMEmbedder, NearestBackend
from visenv.tools.specs import get_tool

SPEC = get_tool("tool_text2image_qwen")
DIM = 384
WORDS = ("fox owl city lake neon watercolour portrait castle forest robot ramen lighthouse desert "
         "sunset winter poster logo cat dragon garden").split()


def prompt(i: int) -> str:
    words = [WORDS[(i >> (4 * k)) % len(WORDS)] for k in range(4)]
    return f"synthetic prompt {i}: a {words[0]} and a {words[1]}, {words[2]} style, {words[3]} light"


def png(seed: int, side: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def build(cache: ToolCache, n: int, batch: int = 10_000) -> dict[str, float]:
    files = []
    for i in range(256):
        sha, path = cache.blobs.put_bytes(png(i), ".png")
        files.append(MediaOutput("image", sha, str(path), {"width": 8, "height": 8}))
    start = time.perf_counter()
    for lo in range(len(cache), n, batch):
        items = [(SPEC, CallKey.of(SPEC, {"prompt": prompt(i)}, seed=i), [files[i % 256]], "", "synthetic")
                 for i in range(lo, min(n, lo + batch))]
        cache.put_many(items)
        print(f"\r  stored {min(n, lo + batch):,} entries", end="", flush=True)
    print()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "entries_per_s": n / seconds if seconds else 0.0}


def bench_exact(cache: ToolCache, n: int, queries: int, rng: np.random.Generator) -> dict[str, dict]:
    picks = rng.integers(n, size=queries).tolist()
    keys = [CallKey.of(SPEC, {"prompt": prompt(i)}, seed=i).digest for i in picks]
    backend = ExactCacheBackend(cache, any_seed=False)
    results = {}
    for name, calls in {
        "get_hit": [lambda k=k: cache.get(k) for k in keys],
        "answer_hit": [lambda i=i: backend.answer(ToolRequest(SPEC, {"prompt": prompt(i)}, {}, i)) for i in picks],
        "answer_miss": [lambda i=i: backend.answer(ToolRequest(SPEC, {"prompt": prompt(i)}, {}, i + 1)) for i in picks],
    }.items():
        samples = []
        for call in calls:
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
        results[name] = percentiles(samples)
    return results


def synthetic_vectors(n: int, seed: int = 0, clusters: int = 4096) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    vectors = np.empty((n, DIM), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        vectors[lo:hi] = centres[rng.integers(clusters, size=hi - lo)] + 0.6 * rng.standard_normal((hi - lo, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def bench_nearest(cache: ToolCache, n: int, queries: int, rng: np.random.Generator) -> tuple[dict, NearestBackend]:
    vectors = synthetic_vectors(n)
    backend = NearestBackend(cache, threshold=-1.0, embedder=MiniLMEmbedder())
    start = time.perf_counter()
    for lo in range(0, n, 50_000):
        hi = min(n, lo + 50_000)
        backend.store_vectors([CallKey.of(SPEC, {"prompt": prompt(i)}, seed=i).digest for i in range(lo, hi)],
                              vectors[lo:hi])
    store_s = time.perf_counter() - start
    start = time.perf_counter()
    backend.refresh()  # no saved index: reads every embedding, trains and fills faiss, saves the index
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    folder = backend.save_index()
    save_s = time.perf_counter() - start
    request = ToolRequest(SPEC, {"prompt": "a query"}, {}, 0)
    picks = rng.integers(n, size=queries)
    noisy = vectors[picks] + 0.02 * rng.standard_normal((queries, DIM)).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    samples = []
    for q in noisy:
        t0 = time.perf_counter()
        answer = backend.answer(request, vector=q)
        samples.append(time.perf_counter() - t0)
        assert answer is not None
    truth_q = noisy[:200]
    best = np.full(len(truth_q), -2.0, np.float32)
    best_id = np.zeros(len(truth_q), np.int64)
    ids = np.arange(1, n + 1)  # entry ids follow insertion order
    for lo in range(0, n, 100_000):
        sims = truth_q @ vectors[lo:lo + 100_000].T
        arg = sims.argmax(axis=1)
        better = sims[np.arange(len(truth_q)), arg] > best
        best[better] = sims[np.arange(len(truth_q)), arg][better]
        best_id[better] = ids[lo + arg[better]]
    recall = float(np.mean([backend.neighbours(request, q)[0][0] == t for q, t in zip(truth_q, best_id)]))
    embedder = MiniLMEmbedder()
    embedder.encode(["warm-up"])
    embed = []
    for i in range(100):
        t0 = time.perf_counter()
        embedder.encode([prompt(n + i)])
        embed.append(time.perf_counter() - t0)
    return {"store_vectors_s": store_s, "build_and_save_s": build_s, "save_s": save_s,
            "saved_index_bytes": sum(f.stat().st_size for f in folder.iterdir()),
            "approximate": n >= backend.ann_threshold, "answer": percentiles(samples), "recall_at_1": recall,
            "query_embedding": percentiles(embed)}, backend


def cold_start_worker(root: str, vector: np.ndarray, results) -> None:
    """A new process's first refresh (load or build the index) and first answer."""
    start = time.perf_counter()
    backend = NearestBackend(root, threshold=-1.0, embedder=MiniLMEmbedder())
    backend.refresh()
    refresh_s = time.perf_counter() - start
    start = time.perf_counter()
    assert backend.answer(ToolRequest(SPEC, {"prompt": "a query"}, {}, 0), vector=vector) is not None
    results.put({"refresh_s": refresh_s, "first_answer_s": time.perf_counter() - start,
                 "index_load": dataclasses.asdict(backend.index_load)})


def bench_cold_start(cache: ToolCache, vector: np.ndarray) -> dict[str, dict]:
    """Time a new process's first refresh without, then with, the saved index."""
    context = multiprocessing.get_context("spawn")
    results = {}
    for name in ("without_saved_index", "with_saved_index"):
        if name == "without_saved_index":
            shutil.rmtree(cache.root / INDEX_DIR)
        queue = context.Queue()
        worker = context.Process(target=cold_start_worker, args=(str(cache.root), vector, queue))
        worker.start()
        results[name] = queue.get()
        worker.join()
        print(f"  {name}: first refresh {results[name]['refresh_s']:.2f} s")
    return results


def write_worker(root: str, worker: int, count: int, ready, done) -> None:
    cache = ToolCache(root)
    blobs = [png(1_000_000 * (worker + 1) + i) for i in range(count)]
    ready.wait()  # every process has started and made its files: the clock starts now
    for i, data in enumerate(blobs):
        sha, path = cache.blobs.put_bytes(data, ".png")
        out = MediaOutput("image", sha, str(path), {"width": 8, "height": 8})
        cache.put(SPEC, CallKey.of(SPEC, {"prompt": f"writer {worker} call {i}"}, seed=i), [out])
    done.put(count)


def bench_writes(root: Path, writers: int, count: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    results = {}
    for procs in sorted({1, writers}):
        folder = root / f"writes-{procs}"
        shutil.rmtree(folder, ignore_errors=True)
        ToolCache(folder)
        ready, done = context.Barrier(procs + 1), context.Queue()
        workers = [context.Process(target=write_worker, args=(str(folder), w, count, ready, done))
                   for w in range(procs)]
        for worker in workers:
            worker.start()
        ready.wait()
        start = time.perf_counter()
        total = sum(done.get() for _ in workers)
        seconds = time.perf_counter() - start
        for worker in workers:
            worker.join()
        assert len(ToolCache(folder)) == total
        results[f"{procs}_process"] = {"entries": total, "seconds": seconds, "entries_per_s": total / seconds}
    return results


def bench_env(cache: ToolCache, nearest: NearestBackend, steps: int) -> dict[str, dict]:
    from visenv.envs.visgen import VisGenEnv
    from visenv.tasks import make_suite

    task = make_suite(1, 0, modality="image")[0]
    for k in range(steps):  # seedless entries: every episode seed hits them
        sha, path = cache.blobs.put_bytes(png(10**7 + k), ".png")
        out = MediaOutput("image", sha, str(path), {"width": 8, "height": 8})
        cache.put(SPEC, CallKey.of(SPEC, {"prompt": f"env bench prompt {k}"}, seed=None), [out])
    attribute = AttributeBackend()
    chains = {"attribute": [attribute], "exact_cache": [ExactCacheBackend(cache), attribute],
              "nearest": [nearest, attribute]}
    results = {}
    for tier, chain in chains.items():
        env = VisGenEnv(tasks=[task], backends={"text2image": chain}, max_turns=10**6)
        env.reset(seed=0, options={"task": task})
        samples, served = [], set()
        for k in range(steps):
            action = ('<tool_call>{"name": "tool_text2image_qwen", "arguments": {"prompt": '
                      f'"env bench prompt {k}"}}}}</tool_call>')
            t0 = time.perf_counter()
            _, _, _, _, info = env.step(action)
            samples.append(time.perf_counter() - t0)
            served.add(info["tool_result"]["backend"])
        results[tier] = {**percentiles(samples), "served_by": sorted(served)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--writes", type=int, default=2000, help="entries each writer process stores")
    parser.add_argument("--env-steps", type=int, default=200)
    parser.add_argument("--cold-start", action="store_true",
                        help="also time a new process's first refresh without and with the saved nearest index")
    parser.add_argument("--root", help="where to build the synthetic cache (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/cache_lookup.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # MiniLM queries one at a time: one thread is fastest and leaves cores to others
    root = Path(args.root or tempfile.mkdtemp(prefix="visenv-cache-bench-"))
    rng = np.random.default_rng(0)
    cache = ToolCache(root / "cache")
    print(f"building {args.entries:,} entries in {root} ...")
    results = {"entries": args.entries, "build": build(cache, args.entries)}
    print("exact lookups ...")
    results["exact"] = bench_exact(cache, args.entries, args.queries, rng)
    print("nearest lookups ...")
    results["nearest"], nearest = bench_nearest(cache, args.entries, args.queries, rng)
    if args.cold_start:
        print("cold start ...")
        results["cold_start"] = bench_cold_start(cache, synthetic_vectors(1)[0])
    print("concurrent writes ...")
    results["writes"] = bench_writes(root, args.writers, args.writes)
    print("env steps ...")
    results["env_step"] = bench_env(cache, nearest, args.env_steps)
    results["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "load_average": os.getloadavg()}
    results["command"] = "python benchmarks/cache_lookup.py " + " ".join(
        f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items() if v not in (None, False))
    results["index_bytes"] = os.path.getsize(cache.index_path)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{'measure':44} {'p50 ms':>9} {'p99 ms':>9}")
    rows = [(f"exact {k}", v) for k, v in results["exact"].items()]
    rows += [("nearest answer (embedding excluded)", results["nearest"]["answer"]),
             ("MiniLM query embedding", results["nearest"]["query_embedding"])]
    rows += [(f"env step, text2image via {k}", v) for k, v in results["env_step"].items()]
    for name, row in rows:
        print(f"{name:44} {row['p50_ms']:>9.3f} {row['p99_ms']:>9.3f}")
    print(f"nearest recall@1 {results['nearest']['recall_at_1']:.3f}; index build+save "
          f"{results['nearest']['build_and_save_s']:.1f} s (save alone {results['nearest']['save_s']:.1f} s, "
          f"{results['nearest']['saved_index_bytes'] / 2**20:,.0f} MiB); "
          f"bulk build {results['build']['entries_per_s']:,.0f} entries/s")
    for name, row in results.get("cold_start", {}).items():
        print(f"cold start, {name.replace('_', ' ')}: first refresh {row['refresh_s']:.2f} s, "
              f"first answer {row['first_answer_s'] * 1000:.1f} ms")
    for name, row in results["writes"].items():
        print(f"writes, {name}: {row['entries_per_s']:,.0f} entries/s")
    print(f"wrote {args.out}")
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
