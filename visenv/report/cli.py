"""``visenv report``: the HTML report of a results.json written by ``rl eval``.

    rl eval --agent teacher --trajectories --out runs/eval/results.json
    visenv report runs/eval/results.json          # runs/eval/report.html + runs/eval/media/

The pictures come from re-playing the recorded actions on the same suite, seed and environment
options, which results.json records (``suite``); ``--suite/--n/--task-seed`` (or ``--tasks``) and
``--seed`` override what it records (or ``rl eval``'s defaults where it records none);
``--no-media`` skips the pictures. Register
the command on a parser with :func:`add_report_commands`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visenv.envs.config import TASK_SUITES
from visenv.error import ConfigError
from visenv.report.collect import replay_captures, suite_of
from visenv.report.page import write_report
from visenv.tasks import load_tasks


def cmd_report(args: argparse.Namespace) -> int:
    """Write report.html (and media/) for a results.json."""
    try:
        payload = json.loads(Path(args.results).read_text(encoding="utf-8"))
        episodes, summary = payload["episodes"], payload["summary"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{args.results} is not a results.json written by `rl eval` ({err}).") from None
    out = Path(args.out) if args.out else Path(args.results).parent
    captures = None
    if not args.no_media:
        recorded = payload.get("suite") or {}
        given = {k: v for k, v in {"suite": args.suite, "n": args.n, "task_seed": args.task_seed}.items()
                 if v is not None}
        defaults = {"suite": "all", "n": 84, "task_seed": 10_000}  # those of `rl eval`
        tasks = load_tasks(args.tasks) if args.tasks else suite_of((recorded or defaults) | given)
        seed = recorded.get("seed", 0) if args.seed is None else args.seed
        captures, _ = replay_captures(episodes, tasks, out, seed=seed, env_config=recorded.get("env_config"))
    path = write_report(out, episodes, summary, captures, title=args.title)
    print(f"wrote {path}")
    return 0


def add_report_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``report`` on a subparsers object; it sets ``func`` (namespace -> exit status).

    Returns:
        The ``report`` parser.
    """
    p = subparsers.add_parser("report", help="write the HTML report of a results.json", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results.json written by `rl eval --trajectories`")
    p.add_argument("--out", help="the report folder (default: the folder of RESULTS)")
    p.add_argument("--suite", choices=TASK_SUITES, help="the evaluated built-in suite (default: as recorded, else all)")
    p.add_argument("--n", type=int, help="number of built-in tasks evaluated (default: as recorded, else 84)")
    p.add_argument("--task-seed", type=int, help="seed of the evaluated suite (default: as recorded, else 10000)")
    p.add_argument("--tasks", help="the evaluated JSONL task file, instead of the built-in suite")
    p.add_argument("--seed", type=int, help="the evaluation seed (default: as recorded, else 0)")
    p.add_argument("--no-media", action="store_true", help="no pictures: skip the replay")
    p.add_argument("--title", default="visenv benchmark report", help="the page title")
    p.set_defaults(func=cmd_report)
    return p
