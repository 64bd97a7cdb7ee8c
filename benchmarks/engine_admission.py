"""Where the in-process engine's time goes on streamed multi-turn rollouts: admission, decode, copies.

The consecutive batches of ``benchmarks/async_rollout.py`` (VisGen at ``tool_latency_scale`` 0.01, a 0.5 s
judge, the paced random agent whose tiny random Llama samples 16 tokens a turn) played through one
:class:`~rl.rollout.EpisodeStream`, first with the same weights throughout, then with weights handed over with
every batch (as in training), with the :class:`~rl.engine.hf.HFEngine` methods timed on its thread:
admitting turns (``_admit``: the prefill forward, then the batch's KV slab rebuilt with the new rows),
compacting finished rows out (``_compact``), building slabs (``_slab``, inside both), the decode steps
(``_step``) and their forwards. Also counted: admissions, rows admitted, the running rows per decode step.

It only wraps methods that every version of the engine has, so it profiles an older checkout too: run it
from that checkout with its root first on ``PYTHONPATH``.

    python benchmarks/engine_admission.py [--batches 3] [--episodes 64] [--envs 32] [--out benchmarks/results/engine_admission.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

import rl.engine.hf as engine_module
from async_rollout import PacedAgentPolicy  # the paced random agent of the async rollout benchmark
from baselines.random_agent import RandomAgent
from rl.hf import tiny_causal_lm
from rl.policy import AgentPolicy
from rl.rollout import EpisodeStream, make_specs, run_episodes
from rl.tokenizer import train_tokenizer
from visenv.envs.visgen import VisGenEnv
from visenv.rewards.rubric import DelayedRubric

SECONDS: dict[str, float] = {}
COUNTS: dict[str, int] = {}


def timed(name: str, function):
    """``function`` with its seconds added to ``SECONDS[name]`` (it runs on the engine's thread only)."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SECONDS[name] = SECONDS.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def instrument() -> None:
    engine = engine_module.HFEngine
    admit, step, forward = engine._admit, engine._step, engine._forward

    def counted_admit(self, admitted):
        COUNTS["admissions"] = COUNTS.get("admissions", 0) + 1
        COUNTS["rows_admitted"] = COUNTS.get("rows_admitted", 0) + len(admitted)
        return admit(self, admitted)

    def counted_step(self):
        COUNTS["decode_steps"] = COUNTS.get("decode_steps", 0) + 1
        COUNTS["running_rows"] = COUNTS.get("running_rows", 0) + len(self._rows)
        return step(self)

    def split_forward(self, ids, mask, positions, cache):
        name = "prefill_forward" if ids.shape[1] > 1 else "decode_forward"
        return timed(name, forward)(self, ids, mask, positions, cache)

    engine._admit = timed("admit", counted_admit)
    engine._step = timed("step", counted_step)
    engine._forward = split_forward
    engine._compact = timed("compact", engine._compact)
    engine_module._slab = timed("slab", engine_module._slab)


def stream(policy, make_env, args, weights) -> dict[str, Any]:
    SECONDS.clear()
    COUNTS.clear()
    envs = [make_env() for _ in range(args.envs)]
    episodes = EpisodeStream(policy, envs)
    try:
        start = time.perf_counter()
        futures = [episodes.submit(make_specs(0, it, args.episodes, 1), it, weights) for it in range(args.batches)]
        for future in futures:
            future.result()
        wall = time.perf_counter() - start
    finally:
        episodes.close()
        for env in envs:
            env.close()
    return {"wall_seconds": round(wall, 2), "seconds": {k: round(v, 2) for k, v in sorted(SECONDS.items())},
            **COUNTS, "rows_per_admission": round(COUNTS["rows_admitted"] / COUNTS["admissions"], 2),
            "running_rows_per_step": round(COUNTS["running_rows"] / COUNTS["decode_steps"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=64, help="episodes per batch")
    parser.add_argument("--envs", type=int, default=32)
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/engine_admission.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    load_start = round(os.getloadavg()[0], 2)

    def make_env() -> VisGenEnv:
        return VisGenEnv(tool_latency_scale=0.01, max_turns=args.max_turns, rubric=DelayedRubric("ltr", 0.5))

    probe = VisGenEnv(max_turns=args.max_turns)
    tokenizer = train_tokenizer([probe.reset(seed=i)[0]["text"] for i in range(100)], 2000)
    policy = PacedAgentPolicy(tiny_causal_lm(len(tokenizer)), tokenizer, AgentPolicy(RandomAgent), max_new_tokens=16)
    run_episodes(policy, [probe], make_specs(1, 0, 2, 1), mode="async")  # warm-up
    instrument()
    runs = {name: stream(policy, make_env, args, weights)
            for name, weights in (("same_weights", None), ("new_weights", policy.get_weights()))}
    import rl

    root = os.path.dirname(os.path.dirname(os.path.abspath(rl.__file__)))
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result = {"runs": runs, "rl_checkout": {"path": root, "commit": commit.stdout.strip() or None},
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)}},
              "command": shlex.join([os.path.basename(sys.executable), *sys.argv])}
    names = ["admit", "prefill_forward", "compact", "slab", "step", "decode_forward"]
    print(f"{'run':<13} {'wall s':>7} " + " ".join(f"{n + ' s':>17}" for n in names)
          + f" {'admissions':>10} {'rows/admission':>14} {'rows/step':>9}")
    for name, run in runs.items():
        print(f"{name:<13} {run['wall_seconds']:>7.2f} "
              + " ".join(f"{run['seconds'].get(n, 0.0):>17.2f}" for n in names)
              + f" {run['admissions']:>10} {run['rows_per_admission']:>14.2f} {run['running_rows_per_step']:>9.1f}")
    print(f"rl from {root} at {result['rl_checkout']['commit']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
