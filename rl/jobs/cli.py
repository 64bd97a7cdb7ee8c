"""``rl main`` (the main job) and ``rl eval`` (any agent, trained policy or API model on a benchmark suite).

    rl main                          # the main job: teacher data, PST, GRPO on Ray, SFT-only vs RL table
    rl main --baselines-only         # the scripted teacher and the random agent on held-out tasks
    rl main --set grpo_seconds=120 --set grpo.kl_coef=0.1     # any MainJobConfig field, dotted into sections
    rl ablate --seeds 0 1 2          # the paper's ablations: the main job in variants x seeds, table + plots
    rl eval --agent teacher          # evaluate a baseline on a suite, write results.json + report.html
    rl eval --policy runs/main/rl/policy --scenarios official_account_cover --max-turns 5
                                     # ... or a trained policy, an agent class (module:Class), an API model:
    rl eval --api http://127.0.0.1:8000/v1 --api-model M \
            --grader-base-url http://127.0.0.1:8001/v1 --grader-model V     # the VisGenBench table with O-Score
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

from rl.evaluate import evaluate, evaluate_with_report
from visenv.cli import suite_from_args, suite_options
from visenv.error import ConfigError
from visenv.evaluation import format_table, write_results
from visenv.imports import import_object
from visenv.rewards.judges.grader import format_benchmark
from visenv.tasks import make_suite


def agent_factory(name: str, seed: int):
    """``teacher``, ``random`` or ``module:Class`` (an agent class; given ``seed=`` when it takes one)."""
    from baselines.random_agent import RandomAgent
    from baselines.workflow_agent import WorkflowAgent

    factories = {"teacher": lambda: WorkflowAgent(seed=seed), "random": lambda: RandomAgent(seed=seed)}
    if name in factories:
        return factories[name]
    cls = import_object(name, "--agent", "'teacher', 'random' or baselines.workflow_agent:WorkflowAgent")
    try:
        takes_seed = "seed" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes_seed = False
    return (lambda: cls(seed=seed)) if takes_seed else cls


def policy_config(args: argparse.Namespace):
    """``--policy DIR``'s :class:`rl.config.PolicyConfig` (kind and chat format from the folder)."""
    from rl.config import PolicyConfig

    if not (Path(args.policy) / "config.json").is_file():
        raise ConfigError(f"--policy {args.policy!r} is not a policy folder (no config.json): give a folder "
                          "written by rl (e.g. runs/main/rl/policy or a checkpoint's policy/).")
    return PolicyConfig.for_folder(args.policy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   device=args.device, images_per_turn=args.images_per_turn)


def load_policy(args: argparse.Namespace, env_config: dict | None = None):
    """``--policy DIR`` or ``--api``: an rl policy (its turns batched over the episodes). An API model,
    and a policy folder of a pretrained chat model (Qwen's chat format or a VLM,
    :meth:`rl.config.PolicyConfig.for_folder`), get the environment's tool documentation as their
    system prompt."""
    if args.policy:
        from rl.config import EnvConfig

        policy = policy_config(args).for_env(EnvConfig(id="visenv/VisGen-v0", options=env_config or {})).build()
    else:
        from rl.api import ApiPolicy
        from visenv.envs.visgen import VisGenEnv

        if not args.api_model:
            raise ConfigError("--api needs --api-model (the model name the endpoint serves).")
        policy = ApiPolicy(args.api_base_url, args.api_model, api_key_env=args.api_key_env,
                           system_prompt=VisGenEnv(env_config).system_prompt, max_tokens=args.max_new_tokens,
                           temperature=args.temperature, timeout=args.api_timeout, concurrency=args.num_envs,
                           max_retries=args.api_retries, vision=args.api_vision)
    return policy


def load_grader(args: argparse.Namespace):
    """``--grader-base-url`` and ``--grader-model``: the VisGenBench grader (a VLM endpoint), or None."""
    if not args.grader_base_url:
        if args.grader_model:
            raise ConfigError("--grader-model needs --grader-base-url (the grader's OpenAI-compatible API root).")
        return None
    if not args.grader_model:
        raise ConfigError("--grader-base-url needs --grader-model (the model name the endpoint serves).")
    from visenv.rewards.judges import BenchmarkGrader, OpenAIChatBackend

    backend = OpenAIChatBackend(args.grader_base_url, args.grader_model, api_key_env=args.grader_key_env)
    return BenchmarkGrader(backend, cache_path=args.grader_cache)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate an agent or a policy on a suite; print the tables, write results.json (and report.html)."""
    tasks = suite_from_args(args)
    if args.images_per_turn < 1 or (args.pixel_size is not None and args.pixel_size < 1):
        raise ConfigError(f"--images-per-turn ({args.images_per_turn}) and --pixel-size ({args.pixel_size}) must be "
                          "at least 1.")
    env_config = {"max_turns": args.max_turns} if args.max_turns else {}
    if args.api_vision or (args.policy and policy_config(args).kind == "vlm"):  # it sees the tool outputs' pixels
        env_config |= {"observe_pixels": True, "max_pixel_images": max(4, args.images_per_turn)}
        if args.pixel_size:
            env_config["pixel_size"] = args.pixel_size
    env_config = env_config or None
    grader = load_grader(args)
    if args.policy or args.api_base_url:
        player = load_policy(args, env_config)
        name, num_envs = args.policy or f"{args.api_model} at {args.api_base_url}", args.num_envs
    else:
        player, name, num_envs = agent_factory(args.agent, args.seed), args.agent, 1
    if args.no_report:
        results, summary = evaluate(player, tasks, seed=args.seed, keep_trajectories=args.trajectories,
                                    env_config=env_config, num_envs=num_envs, grader=grader)
    else:
        results, summary = evaluate_with_report(player, tasks, Path(args.out).parent, seed=args.seed,
                                                env_config=env_config, num_envs=num_envs, grader=grader,
                                                title=f"{name} on {len(tasks)} tasks")
    print(format_table(summary, title=f"== {name} on {len(tasks)} tasks =="))
    print(format_benchmark(summary["visgenbench"]))
    failed = [r for r in results if r.error is not None]
    if failed:
        print(f"failed episodes: {len(failed)} of {len(results)} (scored as failures; first: {failed[0].error})")
    suite = ({"tasks": args.tasks} if args.tasks else
             {"suite": args.suite, "n": args.n, "task_seed": args.task_seed,
              "scenarios": [s.strip() for s in args.scenarios.split(",")] if args.scenarios else None})
    write_results(args.out, results, summary, suite | {"seed": args.seed, "env_config": env_config or {}})
    print(f"wrote {args.out}" + ("" if args.no_report else f" and {Path(args.out).parent / 'report.html'}"))
    if args.api_base_url:
        from rl.api import check_some_answered

        check_some_answered([r.error for r in results])
    return 0


def cmd_main(args: argparse.Namespace) -> int:
    """The main job (:mod:`rl.jobs.main_job`): teacher data -> PST -> GRPO on Ray -> SFT-only vs RL on held-out tasks.

    ``--baselines-only`` prints the old table instead: the scripted teacher and the random agent.
    """
    if args.baselines_only:
        tasks = make_suite(84 if args.n is None else args.n, args.task_seed)
        start = time.perf_counter()
        for name in ("teacher", "random"):
            results, summary = evaluate(agent_factory(name, args.seed), tasks, seed=args.seed)
            print(format_table(summary, title=f"== {name} on {len(tasks)} held-out tasks (seed {args.seed}) =="))
            print()
            if args.out:
                write_results(f"{args.out}/{name}.json", results, summary)
        print(f"done in {time.perf_counter() - start:.1f} s")
        return 0
    from rl.config import apply_overrides, parse_sets
    from rl.jobs.config import MainJobConfig
    from rl.jobs.main_job import run_main_job

    overrides = {"out": args.out or "runs/main", "seed": args.seed, "eval_task_seed": args.task_seed}
    if args.n is not None:
        overrides["eval_tasks"] = overrides["eval_episodes"] = args.n
    if args.greedy:
        overrides["eval_greedy"] = True
    if args.from_sft:
        overrides["sft_policy"] = args.from_sft
    run_main_job(apply_overrides(MainJobConfig(), overrides | parse_sets(args.set)))
    return 0


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``main``, ``ablate`` and ``eval`` on a subparsers object; each sets ``func`` (namespace -> exit
    status)."""
    from rl.jobs.ablate import add_ablate_command

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
                   help="override a field of rl.jobs.config.MainJobConfig (value read as YAML; sections and list "
                        "items dotted), e.g. --set grpo_seconds=120, --set grpo.kl_coef=0.05 or --set "
                        "stages.0.max_steps=285; repeatable")
    p.add_argument("--baselines-only", action="store_true",
                   help="only evaluate the scripted teacher and the random agent (the old main table)")
    p.set_defaults(func=cmd_main)
    add_ablate_command(sub)

    p = sub.add_parser("eval", help="evaluate an agent or a policy on a suite; write results.json and report.html")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--agent", default="teacher",
                     help="teacher, random, or an agent class as module:Class (reset(observation, seed) / "
                          "act(observation); built with seed= when it takes one). Default: teacher")
    who.add_argument("--policy", metavar="DIR", help="a policy folder written by rl (e.g. runs/main/rl/policy)")
    who.add_argument("--api", "--api-base-url", dest="api_base_url", metavar="URL",
                     help="an OpenAI-compatible endpoint (POST URL/chat/completions), with --api-model; it gets the "
                          "tool documentation as its system prompt")
    p.add_argument("--api-model", help="the model name the endpoint serves")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's API key (default OPENAI_API_KEY; unset: none)")
    p.add_argument("--api-vision", action="store_true",
                   help="the model accepts images: the env observes pixels and each turn sends the latest images")
    p.add_argument("--api-timeout", type=float, default=120.0,
                   help="seconds one API turn may take, retries included; then the episode fails (default 120)")
    p.add_argument("--api-retries", type=int, default=4, help="retries of a failed API request (default 4)")
    p.add_argument("--grader-base-url", metavar="URL",
                   help="an OpenAI-compatible VLM endpoint grading the six subjective VisGenBench dimensions "
                        "(with --grader-model); without one they and the O-Score are '-'")
    p.add_argument("--grader-model", help="the grader's model name")
    p.add_argument("--grader-key-env", default="OPENAI_API_KEY", help="environment variable with the grader's key")
    p.add_argument("--grader-cache", metavar="FILE", help="SQLite cache of the grader's answers (default: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of a policy (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens in one policy turn (default 512)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="torch device of a --policy (default cpu)")
    p.add_argument("--images-per-turn", type=int, default=1,
                   help="most images a VLM --policy sees per turn; set it as in training (default 1)")
    p.add_argument("--pixel-size", type=int, default=None,
                   help="side of the images a VLM --policy or --api-vision model sees (the environment's "
                        "pixel_size; default its own, 64); set it as in training (the recipes: 224)")
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
