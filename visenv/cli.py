"""The `visenv` command line: the main job, evaluation, and task-suite files.

    visenv main                      # the main job: teacher data, PST, GRPO on Ray, SFT-only vs RL table
    visenv main --baselines-only     # the scripted teacher and the random agent on held-out tasks
    visenv eval --agent teacher      # evaluate a baseline on a suite, write results.json + report.html
    visenv eval --policy runs/main/rl/policy --scenarios official_account_cover --max-turns 5
                                     # ... or a trained policy, an agent class (module:Class), an API model
    visenv tasks --n 100 --out t.jsonl        # write a task suite
    visenv tasks --bench --out bench.jsonl    # write the 1,200-task VisGenBench-shaped suite
    visenv cache import|build|stats|verify|export|fidelity ...   # the tool-output cache
    visenv data build --n 200 --out data.jsonl    # teacher trajectories for SFT
    visenv report results.json                    # the HTML benchmark report
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from visenv.cache_cli import add_cache_commands
from visenv.data import add_data_commands
from visenv.error import ConfigError, VisenvError
from visenv.evaluation import format_table, write_results
from visenv.report.cli import add_report_commands
from visenv.rewards.judges.grader import format_benchmark
from visenv.tasks import load_tasks, make_suite, save_tasks, visgenbench


def _agent_factory(name: str, seed: int):
    """``teacher``, ``random`` or ``module:Class`` (an agent class; given ``seed=`` when it takes one)."""
    import importlib
    import inspect

    from baselines.random_agent import RandomAgent
    from baselines.workflow_agent import WorkflowAgent

    factories = {"teacher": lambda: WorkflowAgent(seed=seed), "random": lambda: RandomAgent(seed=seed)}
    if name in factories:
        return factories[name]
    module, colon, attribute = name.partition(":")
    if not colon or not module or not attribute:
        raise ConfigError(f"--agent {name!r}: expected 'teacher', 'random' or an agent class as 'module:Class' "
                          "(e.g. baselines.workflow_agent:WorkflowAgent).")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"--agent {name!r}: cannot import it ({error}).") from None
    try:
        takes_seed = "seed" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes_seed = False
    return (lambda: cls(seed=seed)) if takes_seed else cls


def _policy(args: argparse.Namespace):
    """``--policy DIR`` or ``--api-base-url``: an rl policy (its turns batched over the episodes)."""
    if args.policy:
        from rl.config import PolicyConfig

        if not (Path(args.policy) / "config.json").is_file():
            raise ConfigError(f"--policy {args.policy!r} is not a policy folder (no config.json): give a folder "
                              "written by rl (e.g. runs/main/rl/policy or a checkpoint's policy/).")
        policy = PolicyConfig(model=args.policy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              device=args.device).build()
    else:
        from rl.api import ApiPolicy

        if not args.api_model:
            raise ConfigError("--api-base-url needs --api-model (the model name the endpoint serves).")
        policy = ApiPolicy(args.api_base_url, args.api_model, max_tokens=args.max_new_tokens,
                           temperature=args.temperature)
    return policy


def _scenarios(args: argparse.Namespace) -> list[str] | None:
    return [s.strip() for s in args.scenarios.split(",")] if args.scenarios else None


def _suite(args: argparse.Namespace):
    if args.tasks:
        return load_tasks(args.tasks)
    modality = None if args.suite == "all" else args.suite
    return make_suite(args.n, args.task_seed, modality=modality, scenarios=_scenarios(args))


def cmd_main(args: argparse.Namespace) -> int:
    """The main job (visenv.main_job): teacher data -> PST -> GRPO on Ray -> SFT-only vs RL on held-out tasks.

    ``--baselines-only`` prints the old table instead: the scripted teacher and the random agent.
    """
    if args.baselines_only:
        from rl.evaluate import evaluate

        tasks = make_suite(84 if args.n is None else args.n, args.task_seed)
        start = time.perf_counter()
        for name in ("teacher", "random"):
            results, summary = evaluate(_agent_factory(name, args.seed), tasks, seed=args.seed)
            print(format_table(summary, title=f"== {name} on {len(tasks)} held-out tasks (seed {args.seed}) =="))
            print()
            if args.out:
                write_results(f"{args.out}/{name}.json", results, summary)
        print(f"done in {time.perf_counter() - start:.1f} s")
        return 0
    from visenv.main_job import MainJobConfig, run_main_job

    overrides = {"out": args.out or "runs/main", "seed": args.seed, "eval_task_seed": args.task_seed}
    if args.n is not None:
        overrides["eval_tasks"] = overrides["eval_episodes"] = args.n
    if args.greedy:
        overrides["eval_greedy"] = True
    if args.from_sft:
        overrides["sft_policy"] = args.from_sft
    overrides |= _field_overrides(args.set, MainJobConfig)
    run_main_job(MainJobConfig(**overrides))
    return 0


def _field_overrides(pairs: Sequence[str], config_class: type) -> dict[str, Any]:
    """``["field=value", ...]`` -> ``{field: value}`` with YAML values, checked against the dataclass's fields.

    ``field.key=value`` sets one key of a nested config field (``grpo.kl_coef=0.05`` -> ``{"grpo": {"kl_coef":
    0.05}}``); the nested config checks the key.
    """
    import dataclasses

    import yaml

    from visenv.yamlio import load_yaml

    names = {f.name for f in dataclasses.fields(config_class)}
    found = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name, _, key = name.strip().partition(".")
        if not sep or name not in names or (key and not isinstance(found.get(name, {}), dict)):
            raise ConfigError(f"--set {pair!r}: expected FIELD=VALUE (or FIELD.KEY=VALUE for a nested config) "
                              f"with FIELD one of {sorted(names)}.")
        try:
            value = load_yaml(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({error}).") from None
        if key:
            found.setdefault(name, {})[key] = value
        else:
            found[name] = value
    return found


def cmd_eval(args: argparse.Namespace) -> int:
    from rl.evaluate import evaluate, evaluate_with_report

    tasks = _suite(args)
    if args.policy or args.api_base_url:
        player = _policy(args)
        name, num_envs = args.policy or f"{args.api_model} at {args.api_base_url}", args.num_envs
    else:
        player, name, num_envs = _agent_factory(args.agent, args.seed), args.agent, 1
    env_config = {"max_turns": args.max_turns} if args.max_turns else None
    if args.no_report:
        results, summary = evaluate(player, tasks, seed=args.seed, keep_trajectories=args.trajectories,
                                    env_config=env_config, num_envs=num_envs)
    else:
        results, summary = evaluate_with_report(player, tasks, Path(args.out).parent, seed=args.seed,
                                                env_config=env_config, num_envs=num_envs,
                                                title=f"{name} on {len(tasks)} tasks")
    print(format_table(summary, title=f"== {name} on {len(tasks)} tasks =="))
    print(format_benchmark(summary["visgenbench"]))
    suite = ({"tasks": args.tasks} if args.tasks else
             {"suite": args.suite, "n": args.n, "task_seed": args.task_seed,
              "scenarios": _scenarios(args)})
    write_results(args.out, results, summary, suite | {"seed": args.seed, "env_config": env_config or {}})
    print(f"wrote {args.out}" + ("" if args.no_report else f" and {Path(args.out).parent / 'report.html'}"))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    tasks = visgenbench(args.task_seed) if args.bench else _suite(args)
    save_tasks(tasks, args.out)
    print(f"wrote {len(tasks)} tasks to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visenv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def suite_options(p: argparse.ArgumentParser, n: int) -> None:
        p.add_argument("--suite", choices=("all", "image", "video"), default="all",
                       help="built-in scenarios to draw tasks from (default: all 42)")
        p.add_argument("--n", type=int, default=n, help=f"number of built-in tasks (default {n})")
        p.add_argument("--task-seed", type=int, default=10_000,
                       help="seed of the task suite; the default differs from the training suite's (0)")
        p.add_argument("--tasks", help="a JSONL task file instead of the built-in suite")
        p.add_argument("--scenarios", help="comma-separated scenario ids to draw the built-in tasks from (default: all)")

    p = sub.add_parser("main", help="the main job on embedded defaults (teacher data, PST, GRPO, evaluation)")
    p.add_argument("--n", type=int, default=None,
                   help="held-out tasks (main job default 256; --baselines-only default 84, two per scenario)")
    p.add_argument("--task-seed", type=int, default=10_000, help="seed of the held-out suite")
    p.add_argument("--seed", type=int, default=0, help="seed of the job (data, model, GRPO, evaluation)")
    p.add_argument("--out", default="runs/main", help="output folder ('' to skip the baselines' JSON)")
    p.add_argument("--greedy", action="store_true", help="also evaluate both policies greedily (takes longer)")
    p.add_argument("--from-sft", metavar="DIR",
                   help="skip teacher data and PST: start GRPO from this SFT-only policy (<out>/sft/policy of an "
                        "earlier run)")
    p.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                   help="override a MainJobConfig field (value read as YAML), e.g. --set grpo_seconds=120 or "
                        "--set grpo.kl_coef=0.05; "
                        "repeatable; the fields are documented in visenv.main_job.MainJobConfig")
    p.add_argument("--baselines-only", action="store_true",
                   help="only evaluate the scripted teacher and the random agent (the old main table)")
    p.set_defaults(func=cmd_main)

    p = sub.add_parser("eval", help="evaluate an agent or a policy on a suite; write results.json and report.html")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--agent", default="teacher",
                     help="teacher, random, or an agent class as module:Class (reset(observation, seed) / "
                          "act(observation); built with seed= when it takes one). Default: teacher")
    who.add_argument("--policy", metavar="DIR", help="a policy folder written by rl (e.g. runs/main/rl/policy)")
    who.add_argument("--api-base-url", metavar="URL",
                     help="an OpenAI-compatible endpoint (POST URL/chat/completions), with --api-model")
    p.add_argument("--api-model", help="the model name the endpoint serves")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of a policy (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens in one policy turn (default 512)")
    p.add_argument("--device", default="cpu", help="torch device of a --policy: cpu, cuda or auto (default cpu)")
    p.add_argument("--num-envs", type=int, default=16,
                   help="episodes a policy plays at once, one batched generate per step (default 16)")
    p.add_argument("--max-turns", type=int, default=None, help="the environment's turn budget (default: its own)")
    suite_options(p, 84)
    p.add_argument("--seed", type=int, default=0, help="evaluation seed")
    p.add_argument("--out", default="results.json", help="where to write the results")
    p.add_argument("--trajectories", action="store_true",
                   help="keep every turn in results.json (always kept when the report is written)")
    p.add_argument("--no-report", action="store_true",
                   help="skip report.html (written beside results.json by default)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tasks", help="write a task suite as JSONL")
    suite_options(p, 420)
    p.add_argument("--bench", action="store_true", help="the 1,200-task VisGenBench-shaped suite")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.set_defaults(func=cmd_tasks)
    add_cache_commands(sub)
    add_data_commands(sub)
    add_report_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (VisenvError, FileNotFoundError) as error:  # a user's mistake: the message says the fix
        print(f"visenv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
