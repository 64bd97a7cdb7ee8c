"""The `visenv` command line: task-suite files, the tool-output cache and the HTML report.

    visenv tasks --n 100 --out t.jsonl        # write a task suite
    visenv tasks --bench --out bench.jsonl    # write the 1,200-task VisGenBench-shaped suite
    visenv cache import|build|stats|verify|export|fidelity ...   # the tool-output cache
    visenv report results.json                # the HTML benchmark report
    visenv serve --port 8000 --env visenv/VisGen-v0 --option max_turns=12   # the OpenEnv-protocol HTTP server

The commands that play agents or train policies live with the trainer: ``python -m rl.cli main`` (the
main job), ``python -m rl.cli eval`` (an agent, a trained policy or an API model on a suite) and
``python -m rl.cli data build`` (teacher trajectories for SFT).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import yaml

from visenv.cache_cli import add_cache_commands
from visenv.error import ConfigError, VisenvError
from visenv.report.cli import add_report_commands
from visenv.tasks import Task, load_tasks, make_suite, save_tasks, visgenbench
from visenv.yamlio import load_yaml


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


def env_options(pairs: Sequence[str], path: str | None) -> dict:
    """Environment options from a YAML file of options (``--config``) updated by ``--option KEY=VALUE`` pairs."""
    options = {}
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            options = _yaml(handle, f"--config {path}")
        if not isinstance(options, dict):
            raise ConfigError(f"--config {path}: expected a YAML mapping of environment options (max_turns: 12, "
                              f"...), got {type(options).__name__}.")
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE, e.g. --option max_turns=12.")
        options[key.strip()] = _yaml(text, f"--option {key.strip()}")
    return options


def _yaml(source, where: str):
    try:
        return load_yaml(source)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(error).split())}).") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from visenv.server import ServerConfig, serve

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port ({args.port}) must be between 0 and 65535.")
    config = ServerConfig(env_id=args.env, env_options=env_options(args.option, args.config),
                          max_sessions=args.max_sessions, idle_timeout=args.idle_timeout,
                          max_action_chars=args.max_action_chars, max_body_bytes=args.max_body_bytes)
    try:
        serve(config, args.host, args.port, log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
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
    p = sub.add_parser("serve", help="serve an environment over HTTP and WebSocket (OpenEnv's protocol)",
                       description="Serve an environment over HTTP and WebSocket in OpenEnv's protocol (see "
                                   "docs/integrations.md); Ctrl-C or SIGTERM stops it and closes every session.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--env", default="visenv/VisGen-v0", help="the gymnasium id each session builds")
    p.add_argument("--config", help="a YAML file of environment options (max_turns: 12, ...)")
    p.add_argument("--option", metavar="KEY=VALUE", action="append", default=[],
                   help="an environment option, value read as YAML (repeatable; overrides --config)")
    p.add_argument("--max-sessions", type=int, default=64, help="most sessions at once (default 64)")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="seconds after which an unused session is closed (default 300)")
    p.add_argument("--max-action-chars", type=int, default=65_536, help="longest action text (default 65536)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body or WebSocket message (default 1 MiB)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=cmd_serve)
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
