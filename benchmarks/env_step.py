"""Environment overhead per step and per reset, measured with the scripted teacher's turns.

The teacher plays each task once to record its turns; the benchmark then replays those turns
through fresh episodes (same seeds, so the same artifacts) and times only ``env.reset`` and
``env.step``: parse, validate, simulate from the attribute tier, render, and rule rewards.
Pinned to one core.

    python benchmarks/env_step.py [--tasks 84] [--repeats 5] [--out benchmarks/results/env_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from baselines.workflow_agent import WorkflowAgent
from visenv.envs.visgen import VisGenEnv
from visenv.tasks import make_suite


def record_actions(env: VisGenEnv, tasks, seed: int) -> list[list[str]]:
    agent = WorkflowAgent(seed=seed)
    episodes = []
    for i, task in enumerate(tasks):
        obs, _ = env.reset(seed=seed + i, options={"task": task})
        agent.reset(obs, seed=seed + i)
        actions, done = [], False
        while not done:
            action = agent.act(obs)
            actions.append(action)
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
        episodes.append(actions)
    return episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=84)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/env_step.json")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    tasks = make_suite(args.tasks, 10_000)
    env = VisGenEnv(tasks=tasks)
    episodes = record_actions(env, tasks, args.seed)
    steps_per_s, reset_us = [], []
    for _ in range(args.repeats):
        step_time = reset_time = 0.0
        steps = 0
        for i, (task, actions) in enumerate(zip(tasks, episodes)):
            t0 = time.perf_counter()
            env.reset(seed=args.seed + i, options={"task": task})
            t1 = time.perf_counter()
            for action in actions:
                env.step(action)
            t2 = time.perf_counter()
            reset_time += t1 - t0
            step_time += t2 - t1
            steps += len(actions)
        steps_per_s.append(steps / step_time)
        reset_us.append(reset_time / len(tasks) * 1e6)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one core used",
        "python": platform.python_version(),
        "tasks": len(tasks), "steps_per_episode": statistics.mean(len(a) for a in episodes),
        "steps_per_s_median": statistics.median(steps_per_s), "steps_per_s_all": steps_per_s,
        "reset_us_median": statistics.median(reset_us),
    }
    print(f"{'metric':<28}{'value':>14}")
    print(f"{'env steps/s (median)':<28}{result['steps_per_s_median']:>14.0f}")
    print(f"{'reset cost, us (median)':<28}{result['reset_us_median']:>14.1f}")
    print(f"{'steps per episode':<28}{result['steps_per_episode']:>14.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
