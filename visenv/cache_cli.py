"""``visenv cache ...``: build, fill, inspect, check and export a tool cache.

    visenv cache import CACHE FOLDER [--calls FILE]     # outputs you already have (calls.jsonl)
    visenv cache build CACHE CALLS --url URL --model M   # run a real backend, resumable
    visenv cache build CACHE CALLS --callable pkg.mod:generate
    visenv cache stats CACHE [--json]                    # entries per tool, size, hit rates
    visenv cache verify CACHE [--no-hash]                # check the index, quarantine damaged entries
    visenv cache export CACHE OUT [--tool NAME]          # calls.jsonl + media/, re-importable
    visenv cache fidelity CACHE HELDOUT.jsonl [--clip MODEL:TAG]  # C_tool per tier (CLIP or pHash proxy)
    visenv cache index CACHE [--device cuda]             # prebuild the nearest tier's saved index

Calls files are described in :mod:`visenv.tools.cache_io`. Register the commands on a parser
with :func:`add_cache_commands`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from visenv.error import CacheCorruptError
from visenv.imports import import_object
from visenv.tools.cache import INDEX_RECOVERY, ToolCache


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def cmd_import(args: argparse.Namespace) -> int:
    """Import a folder of outputs described by a calls file."""
    from visenv.tools.cache_io import import_calls

    calls = Path(args.calls) if args.calls else Path(args.folder) / "calls.jsonl"
    with ToolCache(args.cache) as cache:
        imported, skipped = import_calls(cache, calls, progress=not args.quiet)
    print(f"imported {imported} entries into {args.cache} ({skipped} already cached)")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Run a real backend over a calls file, recording into the cache; resumes where it stopped."""
    from visenv.tools.cache_io import read_calls
    from visenv.tools.real import OpenAIImagesBackend, RealBackend, record_calls

    cache = ToolCache(args.cache)
    if args.callable:
        backend = RealBackend(import_object(args.callable, "--callable", "mygen:draw"), cache=cache)
    else:
        api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
        backend = OpenAIImagesBackend(args.url, args.model, cache=cache, api_key=api_key, send_seed=args.send_seed,
                                      timeout=args.timeout, max_retries=args.retries,
                                      max_concurrency=args.concurrency)
    calls = read_calls(args.calls, cache=cache, outputs=False)
    report = record_calls(backend, [(c.request(), c.seed) for c in calls], concurrency=args.concurrency,
                          progress=not args.quiet)
    cache.close()
    print(f"recorded {report.recorded}, already cached {report.skipped}, failed {len(report.failed)}")
    for position, reason in report.failed:
        print(f"  line {calls[position].line}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print entries per tool, media size and hit rates."""
    with ToolCache(args.cache) as cache:
        stats = cache.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{stats['entries']} entries, {stats['blobs']} files, {_size(stats['bytes'])} in {args.cache}")
    print(f"{'tool':32} {'entries':>8} {'exact hits':>11} {'exact rate':>11} {'nearest hits':>13} {'nearest rate':>13} "
          f"{'damaged':>8}")
    for tool, row in stats["tools"].items():
        damaged = row.get("missing_file", 0) + row.get("corrupt_file", 0)
        print(f"{tool:32} {row['entries']:>8} {row.get('exact_hit', 0):>11} {_rate(row['exact_hit_rate']):>11} "
              f"{row.get('nearest_hit', 0):>13} {_rate(row['nearest_hit_rate']):>13} {damaged:>8}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the index and every file; quarantine damaged entries. Exit status 1 when anything was damaged."""
    try:
        cache = ToolCache(args.cache)
    except CacheCorruptError as error:  # the index cannot even be opened
        print(f"the index of {args.cache} is damaged: {error.detail}.\n{INDEX_RECOVERY}", file=sys.stderr)
        return 1
    with cache:
        report = cache.verify(check_hashes=not args.no_hash, progress=not args.quiet)
    if report.index_problems:
        problems = "\n  ".join(report.index_problems)
        print(f"the index of {args.cache} is damaged (SQLite integrity check):\n  {problems}\n{report.recovery}",
              file=sys.stderr)
        return 1
    print(f"checked {report.checked} files: {len(report.missing)} missing, {len(report.corrupt)} corrupt, "
          f"{report.quarantined_entries} entries quarantined ({len(report.bad_rows)} for corrupt rows), "
          f"{report.orphans} unreferenced files, {report.temporary_removed} stale temporary files removed")
    if report.embeddings_problems:
        print(f"embeddings.sqlite was damaged ({'; '.join(report.embeddings_problems)}): moved to quarantine/; "
              "the nearest tier embeds the prompts again")
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    """Write calls.jsonl and media/ (re-importable with `visenv cache import`)."""
    from visenv.tools.cache_io import export_cache

    with ToolCache(args.cache) as cache:
        count = export_cache(cache, args.out, tool=args.tool, progress=not args.quiet)
    print(f"exported {count} entries to {args.out}")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Compare each tier's outputs with held-out real outputs (C_tool: CLIP or the perceptual-hash proxy)."""
    from visenv.mediadb import MediaDatabase
    from visenv.tools.attribute import AttributeBackend
    from visenv.tools.cache import ExactCacheBackend
    from visenv.tools.cache_io import read_calls
    from visenv.tools.fidelity import fidelity_report
    from visenv.tools.nearest import NearestBackend

    cache = ToolCache(args.cache)
    tiers = {"exact_cache": ExactCacheBackend(cache), "nearest": NearestBackend(cache, threshold=args.threshold),
             "attribute": AttributeBackend(MediaDatabase.from_folder(args.media) if args.media else None)}
    metric = None
    if args.clip:
        from visenv.rewards.clip import ClipScorer
        from visenv.tools.fidelity import ClipImageSimilarity

        model, _, pretrained = args.clip.partition(":")
        metric = ClipImageSimilarity(ClipScorer(model, pretrained or None))
    report = fidelity_report(read_calls(args.heldout, outputs=True), tiers, metric)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    chance = "-" if report["chance"] is None else f"{report['chance']:.3f}"
    print(f"{report['metric']} (chance level {chance}): {report['note']}")
    print(f"{'tier':12} {'served':>7} {'passed':>7} {'failed':>7} {'C_tool':>7}")
    for name, row in report["tiers"].items():
        c_tool = "-" if row["c_tool"] is None else f"{row['c_tool']:.3f}"
        print(f"{name:12} {row['served']:>7} {row['passed']:>7} {row['failed']:>7} {c_tool:>7}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Build or update the nearest tier's saved index, so that training processes load it instead of building it."""
    from visenv.tools.nearest import MiniLMEmbedder, NearestBackend

    backend = NearestBackend(args.cache, embedder=MiniLMEmbedder(args.device), ann_threshold=args.ann_threshold)
    report = backend.load_index(progress=not args.quiet)
    if not report.saved and (report.added or report.dropped):
        backend.save_index()
    entries = report.loaded - report.dropped + report.added
    print(f"nearest index of {args.cache}: {entries} entries ({report.loaded} loaded from the saved index, "
          f"{report.added} added of which {report.embedded} embedded, {report.dropped} dropped)")
    if report.problem:
        print(f"built anew: {report.problem}")
    return 0


def add_cache_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``cache import|build|stats|verify|export|fidelity|index`` on a subparsers object.

    Each command sets ``func`` (taking the parsed namespace, returning an exit status).

    Returns:
        The ``cache`` parser.
    """
    cache = subparsers.add_parser("cache", help="build, inspect, verify and export a tool-output cache",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = cache.add_subparsers(dest="cache_command", required=True)

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=func.__doc__)
        p.add_argument("cache", help="the cache directory")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    p = command("import", cmd_import, "import outputs you already generated")
    p.add_argument("folder", help="the folder holding the outputs and calls.jsonl")
    p.add_argument("--calls", help="the calls file (default FOLDER/calls.jsonl)")

    p = command("build", cmd_build, "generate outputs with a real backend (resumable)")
    p.add_argument("calls", help="JSONL of calls: tool, arguments, optional seed")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="OpenAI-compatible service root, e.g. http://127.0.0.1:8000/v1")
    source.add_argument("--callable", help="a Python generator 'package.module:function'")
    p.add_argument("--model", default="", help="model name sent to the service")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY; unset: none)")
    p.add_argument("--send-seed", action="store_true", help="send each call's seed to the service")
    p.add_argument("--concurrency", type=int, default=4, help="calls in flight at once (default 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per attempt (default 120)")
    p.add_argument("--retries", type=int, default=4, help="retries per call (default 4)")

    p = command("stats", cmd_stats, "entries per tool, size and hit rates")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("verify", cmd_verify, "check the index and files; quarantine damaged entries")
    p.add_argument("--no-hash", action="store_true", help="check presence and size only (fast)")

    p = command("export", cmd_export, "write calls.jsonl and media/")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--tool", help="export only this tool's entries")

    p = command("fidelity", cmd_fidelity, "compare tiers with held-out real outputs")
    p.add_argument("heldout", help="calls file of held-out calls and their real outputs")
    p.add_argument("--threshold", type=float, default=0.8, help="nearest similarity threshold (default 0.8)")
    p.add_argument("--media", help="media folder of the attribute tier (default: the procedural database)")
    p.add_argument("--clip", metavar="MODEL[:PRETRAINED]",
                   help="score with CLIP image-image similarity, e.g. ViT-B-32:laion2b_s34b_b79k or "
                        "local-dir:/path/to/weights:local (default: the perceptual-hash proxy)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("index", cmd_index, "prebuild the nearest tier's saved vector index")
    p.add_argument("--device", default="cpu", help="torch device that embeds the prompts (default cpu), e.g. cuda")
    p.add_argument("--ann-threshold", type=int, default=20_000,
                   help="the NearestBackend's ann_threshold: group size from which search is approximate "
                        "(default 20000; a backend with another value rebuilds the index)")
    return cache
