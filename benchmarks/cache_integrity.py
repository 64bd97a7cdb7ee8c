"""Cost of the integrity check on served files: ``ExactCacheBackend.answer`` for files of real sizes.

A lookup compares each file's size with the index and hashes the file the first time a process
serves it (and again when its size, mtime or inode change). This times both cases for one cached
file of each size: "first serve" forgets what the process checked before each call (as a new
process would), "later serve" is the next call.

    python benchmarks/cache_integrity.py [--sizes-mib 0.01 1 3 30] [--repeats 30]
                                         [--out benchmarks/results/cache_integrity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from visenv.tools.backends import MediaOutput, ToolRequest
from visenv.tools.cache import ExactCacheBackend, ToolCache
from visenv.tools.cache_key import CallKey
from visenv.tools.specs import get_tool

SPEC = get_tool("tool_text2image_qwen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[0.01, 1, 3, 30])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/cache_integrity.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="visenv-integrity-bench-"))
    cache = ToolCache(root / "cache")
    backend = ExactCacheBackend(cache, any_seed=False)
    rows = {}
    for mib in args.sizes_mib:
        sha, path = cache.blobs.put_bytes(os.urandom(int(mib * 2**20)), ".png")
        cache.put(SPEC, CallKey.of(SPEC, {"prompt": f"file of {mib} MiB"}, seed=0),
                  [MediaOutput("image", sha, str(path), {})])
        request = ToolRequest(SPEC, {"prompt": f"file of {mib} MiB"}, {}, 0)
        first, later = [], []
        for _ in range(args.repeats):
            cache._checked.clear()  # what this process checked before: forgotten, as in a new process
            for samples in (first, later):
                start = time.perf_counter()
                assert backend.answer(request) is not None
                samples.append((time.perf_counter() - start) * 1000)
        rows[str(mib)] = {"first_serve_p50_ms": float(np.median(first)), "later_serve_p50_ms": float(np.median(later))}
    results = {"sizes_mib": rows, "command": "python benchmarks/cache_integrity.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'file MiB':>9} {'first serve ms':>15} {'later serve ms':>15}")
    for mib, row in rows.items():
        print(f"{mib:>9} {row['first_serve_p50_ms']:>15.3f} {row['later_serve_p50_ms']:>15.3f}")
    print(f"wrote {args.out}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
