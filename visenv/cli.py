"""The `visenv` command line: task-suite files, the tool-output cache and the HTML report.

    visenv tasks --n 100 --out t.jsonl        # write a task suite
    visenv tasks --bench --out bench.jsonl    # write the 1,200-task VisGenBench-shaped suite
    visenv cache import|build|stats|verify|export|fidelity ...   # the tool-output cache
    visenv report results.json                # the HTML benchmark report

The commands that play agents or train policies live with the trainer: ``python -m rl.cli main`` (the
main job), ``python -m rl.cli eval`` (an agent, a trained policy or an API model on a suite) and
``python -m rl.cli data build`` (teacher trajectories for SFT).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from visenv.cache_cli import add_cache_commands
from visenv.error import VisenvError
from visenv.report.cli import add_report_commands
from visenv.tasks import Task, load_tasks, make_suite, save_tasks, visgenbench


def suite_options(parser: argparse.ArgumentParser, n: int) -> None:
    """The options that choose a task suite (read back by :func:`suite_from_args`); ``n`` is the default size."""
    parser.add_argument("--suite", choices=("all", "image", "video"), default="all",
                        help="built-in scenarios to draw tasks from (default: all 42)")
    parser.add_argument("--n", type=int, default=n, help=f"number of built-in tasks (default {n})")
    parser.add_argument("--task-seed", type=int, default=10_000,
                        help="seed of the task suite; the default differs from the training suite's (0)")
    parser.add_argument("--tasks", help="a JSONL task file instead of the built-in suite")
    parser.add_argument("--scenarios",
                        help="comma-separated scenario ids to draw the built-in tasks from (default: all)")


def suite_from_args(args: argparse.Namespace) -> list[Task]:
    """The suite that :func:`suite_options`' options name."""
    if args.tasks:
        return load_tasks(args.tasks)
    modality = None if args.suite == "all" else args.suite
    return make_suite(args.n, args.task_seed, modality=modality,
                      scenarios=[s.strip() for s in args.scenarios.split(",")] if args.scenarios else None)


def cmd_tasks(args: argparse.Namespace) -> int:
    tasks = visgenbench(args.task_seed) if args.bench else suite_from_args(args)
    save_tasks(tasks, args.out)
    print(f"wrote {len(tasks)} tasks to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visenv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tasks", help="write a task suite as JSONL")
    suite_options(p, 420)
    p.add_argument("--bench", action="store_true", help="the 1,200-task VisGenBench-shaped suite")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.set_defaults(func=cmd_tasks)
    add_cache_commands(sub)
    add_report_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (VisenvError, OSError) as error:  # a user's mistake (OSError: a path it named): the message says the fix
        print(f"visenv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
