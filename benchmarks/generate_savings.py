"""Sampling cost of ``CausalLMPolicy.generate``'s two savings, on a main job's own policy, side by side.

:meth:`rl.hf.CausalLMPolicy.generate` samples one turn for a batch of conversations; a row that writes
its stop token is done, but until it leaves the batch every step still computes it (and its cache
grows). ``shrink_at=0`` keeps every row to the batch's longest turn; ``0.75`` (the default) drops the
finished rows whenever the running ones are at most three quarters of the batch. And each turn's prompt
is the whole episode so far: ``reuse_prefixes`` (default on) keeps each row's keys and values from one
turn to the next, so a turn prefills only its new tokens. ``0:off`` (neither) is the old behaviour.

The script plays the same episodes in one process with each setting, side by side: a main job's SFT-only
policy (``--policy``, e.g. ``runs/main/sft/policy`` after ``python -m rl.cli main``) on the first tasks
of its RL suite (``--tasks``; ``tasks_rl.jsonl`` of the job's folder by default), ``--envs`` episodes at
once (one batched ``generate`` per step, as one of the job's two Ray workers samples), ``--threads``
torch threads (the job's workers use 1). Each setting ``SHRINK:REUSE`` of ``--settings`` is played
``--repeats`` times, interleaved; it reports the median wall time, the ratio to ``0:off``, the mean
reward, and in how many policy turns the sampled tokens differ from ``0:off`` (float rounding of other
matrix shapes can move a token whose cumulative probability sits at its row's uniform; the rest of that
episode then differs).

    python benchmarks/generate_savings.py --policy runs/main/sft/policy [--tasks runs/main/tasks_rl.jsonl]
        [--episodes 64] [--envs 32] [--threads 1] [--repeats 3] [--settings 0:off,0.75:off,0:on,0.75:on]
        [--out benchmarks/results/generate_savings.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from rl.evaluate import play
from rl.hf import CausalLMPolicy
from rl.jobs.config import MainJobConfig
from rl.policy import POLICY
from visenv.tasks.io import load_tasks


def turns_of(episodes) -> list[list[int]]:
    """Every episode's policy turns, as token id lists, in episode order."""
    return [[list(s.token_ids) for s in e.segments if s.role == POLICY]
            for e in sorted(episodes, key=lambda e: e.spec.episode_id)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="an SFT-only policy folder of a main job (<out>/sft/policy)")
    parser.add_argument("--tasks", default=None, help="tasks JSONL (default: <policy>/../../tasks_rl.jsonl)")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--envs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="0:off,0.75:off,0:on,0.75:on",
                        help="comma-separated SHRINK_AT:REUSE pairs (REUSE on or off); 0:off is the baseline")
    parser.add_argument("--out", default="benchmarks/results/generate_savings.json")
    args = parser.parse_args()
    if args.episodes < 1 or args.envs < 1 or args.threads < 1 or args.repeats < 1:
        parser.error("--episodes, --envs, --threads and --repeats must be positive")
    try:
        settings = [(float(a), {"on": True, "off": False}[b]) for a, b in (x.split(":") for x in args.settings.split(","))]
    except (ValueError, KeyError):
        parser.error(f"--settings {args.settings!r}: give SHRINK_AT:REUSE pairs, e.g. 0:off,0.75:on")
    base = (0.0, False)
    if base not in settings or any(not 0.0 <= shrink <= 1.0 for shrink, _ in settings):
        parser.error("--settings must hold 0:off (the baseline) and shrink values in [0, 1]")
    tasks_path = args.tasks or str(Path(args.policy).resolve().parents[1] / "tasks_rl.jsonl")
    tasks = load_tasks(tasks_path)[: args.episodes]
    torch.set_num_threads(args.threads)
    job = MainJobConfig()
    policy = CausalLMPolicy.from_pretrained(args.policy, max_new_tokens=job.policy.max_new_tokens)
    env_config = dict(job.env.options)

    def run(setting: tuple[float, bool]):
        policy.shrink_at, policy.reuse_prefixes = setting
        start = time.perf_counter()
        episodes, _ = play(policy, tasks, seed=args.seed, env_config=env_config, num_envs=args.envs, progress=False)
        return time.perf_counter() - start, episodes

    run(base)  # warm-up: first-call allocations and imports out of the timings
    rows = {}
    for _ in range(args.repeats):  # settings interleaved, so that a load change hits them alike
        for setting in settings:
            seconds, episodes = run(setting)
            row = rows.setdefault(setting, {"seconds": [], "episodes": episodes})
            row["seconds"].append(seconds)
    baseline_turns = turns_of(rows[base]["episodes"])
    results = {}
    for (shrink, reuse), row in rows.items():
        name = f"{shrink:g}:{'on' if reuse else 'off'}"
        turns = turns_of(row["episodes"])
        pairs = [(a, b) for ea, eb in zip(turns, baseline_turns) for a, b in zip(ea, eb)]
        rewards = [e.reward for e in row["episodes"]]
        results[name] = {"shrink_at": shrink, "reuse_prefixes": reuse,
            "seconds_median": statistics.median(row["seconds"]), "seconds": row["seconds"],
            "speedup_vs_0_off": statistics.median(rows[base]["seconds"]) / statistics.median(row["seconds"]),
            "reward_mean": statistics.fmean(rewards),
            "policy_turns": sum(len(t) for t in turns),
            "policy_tokens": sum(len(x) for t in turns for x in t),
            "turns_differing_from_0_off": sum(a != b for a, b in pairs) + abs(
                sum(len(t) for t in turns) - sum(len(t) for t in baseline_turns)),
        }
        result = results[name]
        print(f"shrink_at={shrink:g} reuse_prefixes={reuse}: {result['seconds_median']:.2f} s "
              f"(x{result['speedup_vs_0_off']:.2f}), reward {result['reward_mean']:.3f}, "
              f"{result['turns_differing_from_0_off']} of {result['policy_turns']} turns differ from 0:off")
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "policy": args.policy,
              "tasks": tasks_path, "episodes": len(tasks), "envs": args.envs, "threads": args.threads,
              "repeats": args.repeats, "seed": args.seed, "max_new_tokens": policy.max_new_tokens,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
